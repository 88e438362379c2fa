"""`gpuvisor models keygen|sign|verify`: make signing keys, sign model files, check signatures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from gpuvisor.cli_options import expand_home, fail, stdout_console
from gpuvisor.errors import ConfigError, GpuvisorError

__all__ = ["models_app"]

models_app = typer.Typer(
    help="Sign model files and check signatures (for pools with requireSignedModels).",
    no_args_is_help=True,
)


@models_app.command("keygen")
def keygen(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            metavar="DIR",
            help="folder to write NAME.key and NAME.pub into",
            callback=expand_home,
        ),
    ],
    name: Annotated[
        str, typer.Option("--name", metavar="NAME", help="file name of the key pair")
    ] = "model-signing",
) -> None:
    """Create an Ed25519 signing key pair: NAME.key (private, mode 0600; keep it secret) and
    NAME.pub (the text to list in a Pool's trustedKeys)."""
    from gpuvisor.security.signing import generate_key_pair

    try:
        pair = generate_key_pair(out, name)
    except GpuvisorError as exc:
        fail(exc)
    console = stdout_console()
    console.print(f"private key: {pair.private_path} (mode 0600; keep it secret)", highlight=False)
    console.print(f"public key:  {pair.public_path} (fingerprint {pair.fingerprint})")
    console.print("add it to the Pool that should trust it:", highlight=False)
    console.print(f"  trustedKeys: [{pair.public_text!r}]", highlight=False, soft_wrap=True)


@models_app.command("sign")
def sign(
    file: Annotated[Path, typer.Argument(help="the model file to sign", callback=expand_home)],
    key: Annotated[
        Path,
        typer.Option(
            "--key",
            metavar="FILE",
            help="private key from 'gpuvisor models keygen'",
            callback=expand_home,
        ),
    ],
    write: Annotated[
        Path | None,
        typer.Option(
            "--write",
            metavar="MANIFEST",
            callback=expand_home,
            help="manifest to update: sets spec.signature of its Model documents whose source "
            "is FILE (the file is rewritten; YAML comments are not kept)",
        ),
    ] = None,
) -> None:
    """Sign a model file (Ed25519 over its SHA-256) and print the line for the Model's
    spec, or write it into a manifest with --write."""
    from gpuvisor.security.signing import load_private_key, sign_file

    console = stdout_console()
    try:
        signature = sign_file(load_private_key(key), file)
        if write is not None:
            names = _write_signature(write, file, signature)
            console.print(f"signed {file}; set spec.signature of {', '.join(names)} in {write}")
            return
    except GpuvisorError as exc:
        fail(exc)
    console.print(f"signature: {signature}", highlight=False, soft_wrap=True)


def _write_signature(manifest: Path, file: Path, signature: str) -> list[str]:
    """Set spec.signature on the manifest's Models whose source is ``file``; return their names."""
    import yaml

    try:
        documents = list(yaml.safe_load_all(manifest.read_text()))
    except FileNotFoundError:
        raise ConfigError(f"manifest {manifest} not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{manifest} is not valid YAML: {exc}") from None
    target = file.resolve()
    names: list[str] = []
    for doc in documents:
        spec: Any = doc.get("spec") if isinstance(doc, dict) else None
        if not isinstance(doc, dict) or doc.get("kind") != "Model" or not isinstance(spec, dict):
            continue
        source = Path(str(spec.get("source", "")))
        if not source.is_absolute():
            source = manifest.parent / source
        if source.resolve() == target:
            spec["signature"] = signature
            names.append(str(doc.get("metadata", {}).get("name", "?")))
    if not names:
        raise ConfigError(
            f"{manifest} has no Model whose spec.source is {file}: check the path, or paste "
            "the printed signature line by hand (run without --write)"
        )
    manifest.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return names


@models_app.command("verify")
def verify(
    file: Annotated[Path, typer.Argument(help="the model file to check", callback=expand_home)],
    signature: Annotated[
        str, typer.Option("--signature", help="the signature text (a Model's spec.signature)")
    ],
    trusted_key: Annotated[
        list[str],
        typer.Option(
            "--trusted-key",
            metavar="KEY",
            callback=expand_home,
            help="a public key 'ed25519:...' or a .pub file (repeatable)",
        ),
    ],
) -> None:
    """Check a model file's signature as a pool with requireSignedModels does: it must be made
    by one of the trusted keys over this very file. Exits 1 with the reason when it is not."""
    from gpuvisor.security.signing import verify_file

    try:
        keys = [_key_text(k) for k in trusted_key]
        signed = verify_file(signature.removeprefix("signature:").strip(), keys, file)
    except GpuvisorError as exc:
        fail(exc)
    stdout_console().print(
        f"OK: {file} (sha256 {signed.sha256}) is signed by trusted key {signed.fingerprint}",
        highlight=False,
        soft_wrap=True,
    )


def _key_text(value: str) -> str:
    """Return the key text of ``value``: itself when it is key text, else the file's content."""
    if value.startswith("ed25519:"):
        return value
    path = Path(value)
    if not path.is_file():
        raise ConfigError(
            f"--trusted-key {value!r} is neither a public key 'ed25519:...' nor a .pub file"
        )
    return path.read_text().strip()
