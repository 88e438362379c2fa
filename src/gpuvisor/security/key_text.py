"""The text of an API key: its format and hash, reading it from request headers, redacting it."""

from __future__ import annotations

import hashlib
import re
import string

from gpuvisor import errors

__all__ = [
    "ID_ALPHABET",
    "ID_LENGTH",
    "KEY_PREFIX",
    "claimed_key_id",
    "extract_key",
    "hash_secret",
    "redact_secrets",
]

KEY_PREFIX = "gvk_"
ID_ALPHABET = string.ascii_lowercase + string.digits
ID_LENGTH = 8


def hash_secret(secret: str) -> str:
    """Return the hex sha256 of a key secret: the only form in which keys are stored."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


_SECRET_IN_TEXT = re.compile(r"(gvk_[a-z0-9]{1,16})_[A-Za-z0-9_-]+")


def redact_secrets(text: str) -> str:
    """``text`` with the secret part of every ``gvk_<id>_<secret>`` in it replaced by ``…``
    (for paths and messages that are logged, recorded or echoed back)."""
    return _SECRET_IN_TEXT.sub(r"\1_…", text)


def claimed_key_id(text: str) -> str | None:
    """The id part of ``gvk_<id>_<secret>`` (or of ``gvk_<id>``) when ``text`` has that form,
    else None; never any of the secret."""
    rest = text.strip().removeprefix(KEY_PREFIX)
    key_id, _, _ = rest.partition("_")
    if (
        text.strip().startswith(KEY_PREFIX)
        and len(key_id) == ID_LENGTH
        and all(c in ID_ALPHABET for c in key_id)
    ):
        return key_id
    return None


def extract_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """Return the key sent as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

    The Authorization header wins when both are sent. Returns None when neither carries
    a key; raises errors.Unauthenticated for an Authorization header that is not a Bearer
    token and no X-API-Key to fall back on.
    """
    if authorization and authorization.strip():
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            return token
        if not (x_api_key and x_api_key.strip()):
            if scheme.lower() == "bearer":
                problem = "empty Bearer token"
            elif not token:  # one word: most likely a key sent without "Bearer " (never echo it)
                problem = "the Authorization header has no scheme"
            elif scheme.isalpha() and len(scheme) <= 16:
                problem = f"unsupported Authorization scheme {scheme!r}"
            else:
                problem = "the Authorization header is not 'Bearer <key>'"
            raise errors.Unauthenticated(f"{problem}: send 'Authorization: Bearer <key>'")
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    return None
