"""Signed models: keys, signatures over a file's SHA-256, and the pool policy's refusals."""

from __future__ import annotations

import base64
import hashlib
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpuvisor.cli import app
from gpuvisor.errors import ConfigError, IntegrityError, ModelError, SpecError
from gpuvisor.security.signed_models import check_signed_models
from gpuvisor.security.signing import (
    KeyPair,
    SignaturePolicy,
    generate_key_pair,
    load_private_key,
    parse_public_key,
    parse_signature,
    sign_file,
    verify_file,
)
from gpuvisor.spec.kinds import Model, Resource
from gpuvisor.spec.loader import load_documents


@pytest.fixture
def keys(tmp_path: Path) -> tuple[KeyPair, KeyPair]:
    """Two key pairs: ``trusted`` (listed by the pool) and ``other`` (not listed)."""
    return generate_key_pair(tmp_path / "keys", "trusted"), generate_key_pair(
        tmp_path / "keys", "other"
    )


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"model bytes " * 1000)
    return path


def _sign(pair: KeyPair, path: Path) -> str:
    return sign_file(load_private_key(pair.private_path), path)


def test_keygen_writes_a_private_key_only_its_owner_can_read(keys: tuple[KeyPair, KeyPair]) -> None:
    trusted, _ = keys
    assert stat.S_IMODE(trusted.private_path.stat().st_mode) == 0o600
    assert trusted.private_path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert trusted.public_path.read_text().strip() == trusted.public_text
    assert trusted.public_text.startswith("ed25519:")
    raw = base64.b64decode(trusted.public_text.removeprefix("ed25519:"))
    assert trusted.fingerprint == "SHA256:" + hashlib.sha256(raw).hexdigest()[:16]
    parse_public_key(trusted.public_text)  # round trip


def test_keygen_never_overwrites_a_key(keys: tuple[KeyPair, KeyPair]) -> None:
    trusted, _ = keys
    before = trusted.private_path.read_bytes()
    with pytest.raises(ConfigError, match="exists already"):
        generate_key_pair(trusted.private_path.parent, "trusted")
    assert trusted.private_path.read_bytes() == before


def test_sign_and_verify_round_trip(keys: tuple[KeyPair, KeyPair], model_file: Path) -> None:
    trusted, other = keys
    signature = _sign(trusted, model_file)
    signed = verify_file(signature, [other.public_text, trusted.public_text], model_file)
    assert signed.fingerprint == trusted.fingerprint
    assert signed.sha256 == hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert parse_signature(signature).key_text == trusted.public_text


def _tamper_signature(signature: str) -> str:
    prefix, key, digest, sig = signature.split(":")
    raw = bytearray(base64.b64decode(sig))
    raw[0] ^= 0xFF
    return ":".join((prefix, key, digest, base64.b64encode(bytes(raw)).decode()))


def _other_digest(signature: str) -> str:
    prefix, key, _, sig = signature.split(":")
    return ":".join((prefix, key, "0" * 64, sig))


# (case, how to make the signature, change the file after signing?, reason, words in the message)
BAD_CASES = [
    ("unsigned", lambda s, o: "", False, "unsigned", ["not signed", "requireSignedModels"]),
    ("other key", lambda s, o: o, False, "untrusted_key", ["not in", "trustedKeys"]),
    ("changed file", lambda s, o: s, True, "changed_after_signing", ["is not the file that was signed"]),
    ("tampered bytes", lambda s, o: _tamper_signature(s), False, "bad_signature", ["altered"]),
    ("digest swapped", lambda s, o: _other_digest(s), False, "bad_signature", ["does not verify"]),
    ("three parts", lambda s, o: s.rsplit(":", 1)[0], False, "malformed_signature", ["4 parts"]),
    ("public key", lambda s, o: s.split(":")[0] + ":" + s.split(":")[1], False,
     "malformed_signature", ["public key, not a signature"]),
    ("bad base64", lambda s, o: s[:-4] + "!!!!", False, "malformed_signature", ["base64"]),
    ("short digest", lambda s, o: s.replace(s.split(":")[2], "abc"), False,
     "malformed_signature", ["64 lowercase hex"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "change", "reason", "words"),
    [case[1:] for case in BAD_CASES],
    ids=[case[0] for case in BAD_CASES],
)
def test_pool_policy_refuses_each_bad_case_with_its_reason(
    keys: tuple[KeyPair, KeyPair],
    model_file: Path,
    make: object,
    change: bool,
    reason: str,
    words: list[str],
) -> None:
    trusted, other = keys
    signature = make(_sign(trusted, model_file), _sign(other, model_file))  # type: ignore[operator]
    if change:
        model_file.write_bytes(model_file.read_bytes() + b"\x00")
    model = _model(model_file, signature)
    policy = SignaturePolicy("secure", (trusted.public_text,))
    with pytest.raises(IntegrityError) as caught:
        policy.check_file(model)
    assert caught.value.fields["reason"] == reason
    assert caught.value.fields["pool"] == "secure"
    for word in words:
        assert word in caught.value.message
    if reason == "untrusted_key":
        assert other.fingerprint in caught.value.message
        assert trusted.fingerprint in caught.value.message  # what it would accept
        assert caught.value.fields["key"] == other.fingerprint
    if reason == "changed_after_signing":
        actual = hashlib.sha256(model_file.read_bytes()).hexdigest()
        assert actual not in caught.value.message and "actual" not in caught.value.fields


def test_pool_policy_accepts_a_correctly_signed_model(
    keys: tuple[KeyPair, KeyPair], model_file: Path
) -> None:
    trusted, _ = keys
    model = _model(model_file, _sign(trusted, model_file))
    signed = SignaturePolicy("secure", (trusted.public_text,)).check_file(model)
    assert signed.fingerprint == trusted.fingerprint


def test_declared_sha256_must_match_the_signed_one(
    keys: tuple[KeyPair, KeyPair], model_file: Path
) -> None:
    trusted, _ = keys
    model = _model(model_file, _sign(trusted, model_file), sha256="a" * 64)
    with pytest.raises(IntegrityError, match="declares sha256") as caught:
        SignaturePolicy("secure", (trusted.public_text,)).check(model)
    assert caught.value.fields["reason"] == "sha256_conflict"


def test_missing_model_file_is_a_model_error(keys: tuple[KeyPair, KeyPair], tmp_path: Path) -> None:
    trusted, _ = keys
    with pytest.raises(ModelError, match="not found"):
        verify_file("ed25519:x:y:z", [trusted.public_text], tmp_path / "gone.onnx")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("ssh-ed25519 AAAA", "expected 'ed25519:<base64>'"),
        ("ed25519:not base64!", "not valid base64"),
        ("ed25519:" + base64.b64encode(b"short").decode(), "5 bytes"),
        ("ed25519:a:" + "0" * 64 + ":b", "is a model signature"),
    ],
)
def test_malformed_public_keys_say_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_public_key(text)


def test_load_private_key_errors(keys: tuple[KeyPair, KeyPair], tmp_path: Path) -> None:
    trusted, _ = keys
    with pytest.raises(ConfigError, match="not found"):
        load_private_key(tmp_path / "missing.key")
    with pytest.raises(ConfigError, match="is a public key"):
        load_private_key(trusted.public_path)
    garbage = tmp_path / "garbage.key"
    garbage.write_text("hello")
    with pytest.raises(ConfigError, match="not a PEM private key"):
        load_private_key(garbage)


# ---- apply-time enforcement -------------------------------------------------------------


def _model(path: Path, signature: str, sha256: str | None = None) -> Model:
    text = MODEL.format(path=path, signature=signature or "null", sha256=sha256 or "null")
    (model,) = load_documents(text, source="model.yaml")
    assert isinstance(model, Model)
    return model


MODEL = """
apiVersion: gpuvisor/v1
kind: Model
metadata: {{name: scorer, tenant: acme}}
spec: {{source: "{path}", signature: {signature}, sha256: {sha256}}}
"""
BASE = """
apiVersion: gpuvisor/v1
kind: Tenant
metadata: {{name: acme}}
spec: {{pools: [secure, open]}}
---
apiVersion: gpuvisor/v1
kind: Profile
metadata: {{name: small}}
spec: {{memory: 256Mi}}
---
apiVersion: gpuvisor/v1
kind: Pool
metadata: {{name: secure}}
spec: {{requireSignedModels: true, trustedKeys: ["{key}"]}}
---
apiVersion: gpuvisor/v1
kind: Pool
metadata: {{name: open}}
"""
DEPLOYMENT = """
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {{name: scorer, tenant: acme}}
spec: {{model: scorer, profile: small, pool: {pool}}}
"""


def _docs(text: str) -> list[Resource]:
    return load_documents(text, source="test.yaml")


def test_apply_refuses_unsigned_and_untrusted_models_in_a_signed_pool(
    keys: tuple[KeyPair, KeyPair], model_file: Path
) -> None:
    trusted, other = keys
    base = _docs(BASE.format(key=trusted.public_text))
    deployment = _docs(DEPLOYMENT.format(pool="secure"))
    for signature, reason, word in [
        ("", "unsigned", "not signed"),
        (_sign(other, model_file), "untrusted_key", other.fingerprint),
        ("ed25519:broken", "malformed_signature", "malformed"),
    ]:
        model = [_model(model_file, signature)]
        with pytest.raises(IntegrityError) as caught:
            check_signed_models([*model, *deployment], base)
        assert caught.value.fields["reason"] == reason
        assert "Deployment acme/scorer" in caught.value.message and word in caught.value.message
    good = [_model(model_file, _sign(trusted, model_file))]
    check_signed_models([*good, *deployment], base)


def test_apply_checks_what_a_pool_change_affects_and_ignores_open_pools(
    keys: tuple[KeyPair, KeyPair], model_file: Path
) -> None:
    trusted, _ = keys
    base = _docs(BASE.format(key=trusted.public_text))
    unsigned = [_model(model_file, "")]
    # an unsigned model is fine in a pool that does not require signatures
    open_dep = _docs(DEPLOYMENT.format(pool="open"))
    check_signed_models([*unsigned, *open_dep], base)
    # ... until that pool starts requiring them: applying the Pool alone is refused
    stored = [*base, *unsigned, *open_dep]
    stricter = _docs(
        "apiVersion: gpuvisor/v1\nkind: Pool\nmetadata: {name: open}\n"
        f'spec: {{requireSignedModels: true, trustedKeys: ["{trusted.public_text}"]}}\n'
    )
    with pytest.raises(IntegrityError, match="not signed"):
        check_signed_models(stricter, stored)
    # an apply that touches none of them is not blocked by what is stored
    profile = _docs("apiVersion: gpuvisor/v1\nkind: Profile\nmetadata: {name: big}\n"
                    "spec: {memory: 1Gi}\n")  # fmt: skip
    check_signed_models(profile, [*stored[:-1], *stricter, stored[-1]])


def test_apply_refuses_malformed_trusted_keys(keys: tuple[KeyPair, KeyPair]) -> None:
    pool = _docs(
        "apiVersion: gpuvisor/v1\nkind: Pool\nmetadata: {name: p}\n"
        'spec: {requireSignedModels: true, trustedKeys: ["ssh-ed25519 AAAA"]}\n'
    )
    with pytest.raises(SpecError) as caught:
        check_signed_models(pool, [])
    # where it is, as every other apply problem says it
    assert caught.value.message.startswith("test.yaml doc 1 Pool/p: spec.trustedKeys[0]: ")


# ---- the command line -------------------------------------------------------------------


def test_cli_keygen_sign_verify(tmp_path: Path, model_file: Path) -> None:
    runner = CliRunner()
    made = runner.invoke(app, ["models", "keygen", "--out", str(tmp_path / "k")])
    assert made.exit_code == 0, made.output
    key, pub = tmp_path / "k" / "model-signing.key", tmp_path / "k" / "model-signing.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    signed = runner.invoke(app, ["models", "sign", "--key", str(key), str(model_file)])
    assert signed.exit_code == 0, signed.output
    line = signed.output.strip()
    assert line.startswith("signature: ed25519:")
    ok = runner.invoke(
        app,
        ["models", "verify", "--signature", line, "--trusted-key", str(pub), str(model_file)],
    )
    assert ok.exit_code == 0 and "OK" in ok.output, ok.output
    model_file.write_bytes(b"changed")
    bad = runner.invoke(
        app,
        ["models", "verify", "--signature", line, "--trusted-key", str(pub), str(model_file)],
    )
    assert bad.exit_code == 1 and "is not the file that was signed" in bad.output
    missing = runner.invoke(app, ["models", "sign", "--key", str(tmp_path / "no.key"), "x"])
    assert missing.exit_code == 1 and "keygen" in missing.output
    wrong = runner.invoke(app, ["models", "sign", "--key", str(pub), str(model_file)])
    assert wrong.exit_code == 1 and "is a public key" in wrong.output


def test_cli_sign_writes_the_signature_into_a_manifest(
    keys: tuple[KeyPair, KeyPair], tmp_path: Path, model_file: Path
) -> None:
    trusted, _ = keys
    manifest = tmp_path / "model.yaml"
    manifest.write_text(
        "apiVersion: gpuvisor/v1\nkind: Model\nmetadata: {name: scorer, tenant: acme}\n"
        "spec: {source: model.onnx}\n---\n"
        "apiVersion: gpuvisor/v1\nkind: Model\nmetadata: {name: other, tenant: acme}\n"
        "spec: {source: other.onnx}\n"
    )
    result = CliRunner().invoke(
        app,
        ["models", "sign", "--key", str(trusted.private_path), str(model_file),
         "--write", str(manifest)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    scorer, other = load_documents(manifest.read_text(), source="m", base_dir=tmp_path)
    assert isinstance(scorer, Model) and isinstance(other, Model)
    policy = SignaturePolicy("secure", (trusted.public_text,))
    assert policy.check_file(scorer).fingerprint == trusted.fingerprint
    assert other.spec.signature is None


def test_cli_paths_given_with_a_tilde_the_shell_left_are_under_home(
    tmp_path: Path, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--out=~/keys`` reaches the command as it is written (the shell expands ``~`` only at
    the start of a word): the key pair goes to the home folder, not to a ``~`` folder here."""
    home, here = tmp_path / "home", tmp_path / "here"
    here.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    runner = CliRunner()
    made = runner.invoke(app, ["models", "keygen", "--out=~/.gpuvisor/keys"])
    assert made.exit_code == 0, made.output
    key = home / ".gpuvisor" / "keys" / "model-signing.key"
    assert key.is_file() and not (here / "~").exists()
    assert f"private key: {key} " in made.output.replace("\n", "")
    signed = runner.invoke(
        app, ["models", "sign", "--key=~/.gpuvisor/keys/model-signing.key", str(model_file)]
    )
    assert signed.exit_code == 0, signed.output
