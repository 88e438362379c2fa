"""Signed models: Ed25519 keys, signatures over a model file's SHA-256, and the pool policy
(``requireSignedModels``, ``trustedKeys``) that refuses what is unsigned, untrusted or changed.

Text forms (both fit on one YAML line):

- public key: ``ed25519:<base64 of the 32-byte raw key>`` (what a Pool's ``trustedKeys`` lists);
- signature: ``ed25519:<public key base64>:<sha256 hex>:<signature base64>`` (a Model's
  ``spec.signature``). The signature is Ed25519 over the 32 raw bytes of the file's SHA-256;
  carrying the digest lets a changed file be told apart from a damaged signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gpuvisor.errors import ConfigError, IntegrityError
from gpuvisor.runtime.executors.base import file_sha256
from gpuvisor.spec.kinds import Model, Pool

__all__ = [
    "KeyPair",
    "ModelSignature",
    "SignaturePolicy",
    "file_sha256",
    "fingerprint",
    "generate_key_pair",
    "load_private_key",
    "parse_public_key",
    "parse_signature",
    "public_key_text",
    "sign_file",
    "verify_file",
]

PREFIX = "ed25519"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_FORMAT_HINT = (
    "spec.signature must be the line 'gpuvisor models sign' prints: "
    "ed25519:<public key>:<sha256>:<signature>"
)


@dataclass(frozen=True)
class KeyPair:
    """Where ``generate_key_pair`` wrote the keys, and the public key's text form."""

    private_path: Path
    public_path: Path
    public_text: str
    fingerprint: str


@dataclass(frozen=True)
class ModelSignature:
    """A parsed ``spec.signature``: who signed, which digest, and the signature bytes."""

    public_key: Ed25519PublicKey
    sha256: str
    signature: bytes

    @property
    def key_text(self) -> str:
        return public_key_text(self.public_key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)


# ---- keys -----------------------------------------------------------------------------------


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_text(public_key: Ed25519PublicKey) -> str:
    """Return the key as ``ed25519:<base64>``, the form a Pool's ``trustedKeys`` lists."""
    return f"{PREFIX}:{base64.b64encode(_raw(public_key)).decode()}"


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """Return a short name for the key: ``SHA256:`` and 16 hex digits of the raw key's hash."""
    return "SHA256:" + hashlib.sha256(_raw(public_key)).hexdigest()[:16]


def _decode_key(encoded: str, what: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64") from None
    if len(raw) != 32:
        raise ValueError(f"{what} is {len(raw)} bytes, an Ed25519 public key is 32")
    return Ed25519PublicKey.from_public_bytes(raw)


def parse_public_key(text: str) -> Ed25519PublicKey:
    """Return the key of ``ed25519:<base64>`` text. Raises ValueError saying what is wrong."""
    text = text.strip()
    prefix, sep, encoded = text.partition(":")
    if not sep or prefix != PREFIX:
        raise ValueError(
            f"{_short(text)!r} is not an Ed25519 public key: expected 'ed25519:<base64>' "
            "(the .pub file 'gpuvisor models keygen' writes)"
        )
    if encoded.count(":") == 2:
        raise ValueError(
            f"{_short(text)!r} is a model signature, not a public key: "
            "use the .pub file 'gpuvisor models keygen' wrote"
        )
    return _decode_key(encoded, f"public key {_short(text)!r}")


def generate_key_pair(out_dir: Path, name: str = "model-signing") -> KeyPair:
    """Write a new key pair to ``out_dir/<name>.key`` (PEM, mode 0600) and ``<name>.pub``.

    Raises ConfigError when either file exists already (a signing key is never overwritten).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(
                f"{path} exists already: move it away or choose another --name "
                "(a signing key is never overwritten)"
            )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # created 0600 from the start, so the secret is never readable by others, even briefly
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as stream:
        stream.write(pem)
    text = public_key_text(key.public_key())
    public_path.write_text(text + "\n")
    return KeyPair(private_path, public_path, text, fingerprint(key.public_key()))


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Return the Ed25519 private key in the PEM file at ``path``.

    Raises ConfigError when the file is missing, not a PEM private key, or not Ed25519.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"signing key {path} not found: create one with 'gpuvisor models keygen --out DIR'"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read signing key {path}: {exc.strerror}") from None
    if data.lstrip().startswith(PREFIX.encode()):
        raise ConfigError(
            f"{path} is a public key; signing needs the private key (the .key file next to it)"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"{path} is encrypted; gpuvisor needs an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{path} is not a PEM private key: use the .key file 'gpuvisor models keygen' wrote"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}; model signing needs Ed25519")
    return key


# ---- signatures ---------------------------------------------------------------------------


def sign_file(key: Ed25519PrivateKey, path: Path) -> str:
    """Return the signature text (for ``spec.signature``) of the file at ``path``."""
    digest = file_sha256(path)
    signature = key.sign(bytes.fromhex(digest))
    return ":".join(
        (
            PREFIX,
            base64.b64encode(_raw(key.public_key())).decode(),
            digest,
            base64.b64encode(signature).decode(),
        )
    )


def parse_signature(text: str) -> ModelSignature:
    """Return the parts of a signature text. Raises ValueError saying which part is wrong."""
    parts = text.strip().split(":")
    if len(parts) != 4 or parts[0] != PREFIX:
        if len(parts) == 2 and parts[0] == PREFIX:
            raise ValueError("it is a public key, not a signature")
        raise ValueError(f"expected 4 parts separated by ':', found {len(parts)}")
    _, key, digest, signature = parts
    public_key = _decode_key(key, "its public key")
    if not _SHA256_RE.match(digest):
        raise ValueError("its sha256 part is not 64 lowercase hex digits")
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("its signature part is not valid base64") from None
    if len(raw) != 64:
        raise ValueError(f"its signature part is {len(raw)} bytes, an Ed25519 signature is 64")
    return ModelSignature(public_key, digest, raw)


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- the pool policy ------------------------------------------------------------------------


@dataclass(frozen=True)
class SignaturePolicy:
    """A pool's rule for the models its slices load: which keys may sign them."""

    pool: str
    """The pool's name; empty for a check on the command line (``gpuvisor models verify``)."""
    trusted_keys: tuple[str, ...]

    @classmethod
    def of(cls, pool: Pool | None) -> SignaturePolicy | None:
        """Return the policy of a pool that requires signed models, else None."""
        if pool is None or not pool.spec.require_signed_models:
            return None
        return cls(pool.metadata.name, tuple(pool.spec.trusted_keys))

    @property
    def _keys_name(self) -> str:
        return f"the trustedKeys of pool '{self.pool}'" if self.pool else "the trusted keys given"

    def key_problems(self) -> list[str]:
        """Return one line per ``trustedKeys`` entry that is not an Ed25519 public key."""
        problems = []
        for i, text in enumerate(self.trusted_keys):
            try:
                parse_public_key(text)
            except ValueError as exc:
                where = f"pool '{self.pool}' spec.trustedKeys[{i}]" if self.pool else "trusted key"
                problems.append(f"{where}: {exc}")
        return problems

    def _trusted(self) -> dict[bytes, str]:
        trusted = {}
        for text in self.trusted_keys:
            try:
                key = parse_public_key(text)
            except ValueError:
                continue  # reported by key_problems at apply time; it trusts nothing
            trusted[_raw(key)] = fingerprint(key)
        return trusted

    def check(self, model: Model, actual_sha256: str | None = None) -> ModelSignature:
        """Return the model's signature when this pool accepts it.

        ``actual_sha256`` is the digest of the file as it is now; when given, it must equal
        the digest that was signed. Raises IntegrityError whose ``reason`` field is one of
        ``unsigned``, ``malformed_signature``, ``untrusted_key``, ``bad_signature``,
        ``sha256_conflict`` or ``changed_after_signing``.
        """
        return self._check(
            f"model '{model.metadata.name}@{model.spec.version}'",
            model.spec.source,
            model.spec.signature,
            model.spec.sha256,
            actual_sha256,
            {"model": model.metadata.name, "pool": self.pool},
        )

    def _check(
        self,
        what: str,
        source: str,
        signature: str | None,
        declared: str | None,
        actual_sha256: str | None,
        context: dict[str, str],
    ) -> ModelSignature:
        if not signature:
            needs = f"pool '{self.pool}' requires signed models (requireSignedModels)"
            raise IntegrityError(
                f"{what} is not signed, and {needs if self.pool else 'a signature is needed'}: run 'gpuvisor models sign --key KEY {source}' "
                "and put the line it prints in the Model's spec.signature",
                reason="unsigned",
                **context,
            )
        try:
            signed = parse_signature(signature)
        except ValueError as exc:
            raise IntegrityError(
                f"{what} has a malformed signature ({exc}): {_FORMAT_HINT}",
                reason="malformed_signature",
                **context,
            ) from None
        trusted = self._trusted()
        if _raw(signed.public_key) not in trusted:
            known = ", ".join(sorted(trusted.values())) or "none"
            raise IntegrityError(
                f"{what} is signed by key {signed.fingerprint}, which is not in "
                f"{self._keys_name} (trusted: {known}): add that key's .pub text "
                f"({signed.key_text}) to trustedKeys if you trust it, or sign the model "
                "with a trusted key",
                reason="untrusted_key",
                key=signed.fingerprint,
                **context,
            )
        try:
            signed.public_key.verify(signed.signature, bytes.fromhex(signed.sha256))
        except InvalidSignature:
            raise IntegrityError(
                f"the signature of {what} does not verify with key {signed.fingerprint}: it "
                "was altered after 'gpuvisor models sign' made it; sign the file again",
                reason="bad_signature",
                key=signed.fingerprint,
                **context,
            ) from None
        if declared is not None and declared.lower() != signed.sha256:
            raise IntegrityError(
                f"{what} declares sha256 {declared.lower()} but its signature covers "
                f"{signed.sha256}: sign the file again or correct spec.sha256",
                reason="sha256_conflict",
                **context,
            )
        if actual_sha256 is not None and actual_sha256 != signed.sha256:
            raise IntegrityError(
                f"model file {source} is not the file that was signed (it is another file, "
                f"or it changed after signing): the signature (key {signed.fingerprint}) "
                f"covers sha256 {signed.sha256}, which this file does not have; name the "
                "signed file, or sign this one ('gpuvisor models sign') and update "
                "spec.signature",
                reason="changed_after_signing",
                key=signed.fingerprint,
                expected=signed.sha256,
                **context,
            )
        return signed

    def check_file(self, model: Model) -> ModelSignature:
        """Check the model's signature and that its file is still the one signed (reads it)."""
        return self.check(model, file_sha256(Path(model.spec.source)))


def verify_file(signature: str, trusted_keys: Sequence[str], path: Path) -> ModelSignature:
    """Check ``signature`` of the file at ``path`` against ``trusted_keys``, as a pool does.

    Returns the parsed signature (``.fingerprint`` names the key that signed). Raises
    IntegrityError with a ``reason`` as ``SignaturePolicy.check`` does, ModelError when the
    file cannot be read, ConfigError when a trusted key is malformed.
    """
    policy = SignaturePolicy("", tuple(trusted_keys))
    problems = policy.key_problems()
    if problems:
        raise ConfigError("; ".join(problems))
    return policy._check(
        f"model file {path}", str(path), signature, None, file_sha256(path), {"path": str(path)}
    )
