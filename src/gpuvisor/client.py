"""A small client for a running node's admin API, used by the CLI (like kubectl's)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from gpuvisor.errors import ConfigError, GpuvisorError, Unauthenticated, error_from_code
from gpuvisor.security.admin_key import admin_key_path, read_admin_key

__all__ = ["DEFAULT_STATE", "DEFAULT_URL", "NodeClient", "node_url", "resolve_state_dir"]

DEFAULT_URL = "http://127.0.0.1:8700"
DEFAULT_STATE = "~/.gpuvisor"
_URL_HINT = f"use --url or GPUVISOR_URL, e.g. {DEFAULT_URL}"


def resolve_state_dir(state: str | None) -> Path:
    """Return the state directory: ``--state``, else GPUVISOR_STATE, else ~/.gpuvisor."""
    return Path(state or os.environ.get("GPUVISOR_STATE") or DEFAULT_STATE).expanduser()


def node_url(url: str | None) -> str:
    """Return the node's URL: ``url``, else GPUVISOR_URL, else the default; ``host:port``
    without a scheme means plain HTTP, which is what a node serves."""
    text = (url or os.environ.get("GPUVISOR_URL") or DEFAULT_URL).strip().rstrip("/")
    text = text if "://" in text else f"http://{text}"
    api = next((a for a in _API_PATHS if urlsplit(text).path.endswith(a)), None)
    if api is not None:
        raise ConfigError(
            f"{text} is the address of the node's {api} API, not of the node: give --url "
            f"(or GPUVISOR_URL) as {text.removesuffix(api)}, which the commands add {api} to"
        )
    return text


_API_PATHS = ("/api/v1", "/v2")


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` names this machine by a loopback address (127.0.0.0/8, ::1, localhost)."""
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _key(given: str | None, state_dir: Path, url: str = DEFAULT_URL) -> str:
    """The key a command uses: ``given`` (--key), else GPUVISOR_KEY, else the state directory's
    admin key, which goes only to a node on this machine (a loopback ``url``). One given but
    empty is an error, never a silent fall back to the admin key (a script's ``--key
    "$TENANT_KEY"`` with the variable unset must not run as admin)."""
    if given is None:
        given = os.environ.get("GPUVISOR_KEY")
    if given is not None:
        if not given.strip():
            raise ConfigError(
                "the API key given (--key or GPUVISOR_KEY) is empty: pass the key itself, or "
                f"neither to use the admin key in {admin_key_path(state_dir)}"
            )
        return given.strip()
    found = read_admin_key(state_dir)
    if found:
        if not is_loopback_url(url):
            raise ConfigError(
                f"no API key for {url}: the admin key in {admin_key_path(state_dir)} is the "
                "local node's, and is not sent to another machine. Pass --key or set "
                "GPUVISOR_KEY to a key of that node"
            )
        return found
    path = admin_key_path(state_dir)
    if path.exists():
        raise ConfigError(f"no API key: {path} is empty. Pass --key or set GPUVISOR_KEY")
    if (state_dir / "gpuvisor.db").exists():
        raise ConfigError(
            f"no API key: {path} is missing, and a node has started on {state_dir} before "
            "(it writes the file on its first start only). Pass --key or set GPUVISOR_KEY "
            "to an admin key"
        )
    raise ConfigError(
        f"no API key: pass --key, set GPUVISOR_KEY, or start the node once so that {path} exists"
    )


class NodeClient:
    """Talks to the node at ``url`` with ``key`` (else GPUVISOR_KEY, else the state dir's admin key)."""

    def __init__(
        self,
        url: str | None = None,
        key: str | None = None,
        state: str | None = None,
        timeout: float = 300.0,
    ) -> None:
        self.url = node_url(url)
        state_dir = resolve_state_dir(state)
        self.key = _key(key, state_dir, self.url)
        given = key is not None or os.environ.get("GPUVISOR_KEY") is not None
        # where the key came from, for a node that does not know it
        self.key_source = "" if given else str(admin_key_path(state_dir))
        try:
            self.http = httpx.Client(
                base_url=self.url,
                timeout=timeout,
                headers={"Authorization": f"Bearer {self.key}"},
                # a node on this machine is reached directly, never through HTTP_PROXY
                trust_env=not is_loopback_url(self.url),
            )
        except httpx.InvalidURL as exc:
            raise ConfigError(f"{self.url!r} is not a node URL ({exc}): {_URL_HINT}") from None

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send a request; return the decoded JSON; raise the node's error as a GpuvisorError
        (ConfigError when the URL is wrong or nothing answers there)."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            if self.url.startswith("https:") and "SSL" in str(exc):
                plain = "http:" + self.url.removeprefix("https:")
                raise ConfigError(
                    f"the node at {self.url} does not speak TLS ({exc}): a gpuvisor node "
                    f"serves plain HTTP, so use {plain} (or put a TLS proxy in front of it)"
                ) from None
            raise ConfigError(
                f"cannot reach a gpuvisor node at {self.url}: is 'gpuvisor up' running? "
                "(use --url or GPUVISOR_URL for another address)"
            ) from None
        except httpx.TimeoutException:
            raise GpuvisorError(f"the node at {self.url} did not answer in time") from None
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise ConfigError(f"cannot use {self.url} as a node URL ({exc}): {_URL_HINT}") from None
        except httpx.HTTPError as exc:
            raise GpuvisorError(
                f"the request to {self.url} failed ({type(exc).__name__}: {exc}): is it a "
                f"gpuvisor node? ({_URL_HINT})"
            ) from None
        if response.status_code >= 400:
            try:
                body = response.json()
                message, code = body.get("error", response.text), body.get("code", "")
            except ValueError:
                message, code = response.text, ""
            if response.status_code == 401:
                if self.key_source:
                    message += (
                        f" (the key is the admin key in {self.key_source}: is {self.url} the "
                        "node of that state directory? Pass --state for another node's, or "
                        "--key)"
                    )
                raise Unauthenticated(message)
            error = error_from_code(code, message) if code else GpuvisorError(message)
            error.http_status = response.status_code
            raise error
        try:
            return response.json()
        except ValueError:
            raise GpuvisorError(
                f"{self.url}{path} answered {response.status_code} but not with JSON: is it a "
                f"gpuvisor node? ({_URL_HINT})"
            ) from None

    def apply(self, text: str, source: str, base_dir: Path | None) -> Any:
        headers = {"Content-Type": "application/yaml", "X-Gpuvisor-Source": source}
        if base_dir is not None:
            headers["X-Gpuvisor-Base-Dir"] = str(base_dir.resolve())
        return self.request("POST", "/api/v1/apply", content=text.encode(), headers=headers)
