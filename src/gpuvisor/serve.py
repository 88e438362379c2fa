"""`gpuvisor up`: prepare the state directory (and the demo), run the node under uvicorn, and
tell the operator where everything is once it is ready."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import uvicorn
from rich.console import Console
from rich.markup import escape
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from gpuvisor import __version__
from gpuvisor.api.app import create_app
from gpuvisor.api.timeouts import http_protocol
from gpuvisor.client import DEFAULT_STATE, DEFAULT_URL, resolve_state_dir
from gpuvisor.demo.setup import DemoState, prepare_demo
from gpuvisor.errors import ConfigError
from gpuvisor.inventory.discovery import discover
from gpuvisor.logs import configure_logging
from gpuvisor.node import Node, NodeOptions
from gpuvisor.security.admin_key import read_admin_key
from gpuvisor.security.keys import KeyRing, admin_key_path, claimed_key_id
from gpuvisor.serve_guards import (
    HeldLock,
    check_port_free,
    check_state_dir,
    lock_database,
    lock_state_dir,
    make_state_dir,
    raise_open_file_limit,
)
from gpuvisor.spec.kinds import Node as NodeDoc
from gpuvisor.spec.kinds import NodeSpec
from gpuvisor.spec.loader import load_documents
from gpuvisor.store.db import check_database_url, default_url
from gpuvisor.store.repo import Store

__all__ = ["load_node_config", "serve_node"]

log = logging.getLogger("gpuvisor.node")


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """Return uvloop's loop factory when uvloop is installed (``uvicorn[standard]`` brings it),
    else None (asyncio's own loop). The node runs its HTTP server, dispatchers and worker links
    on one loop, so the faster loop speeds up the whole request path."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def load_node_config(path: Path | None) -> NodeSpec:
    """Return the node configuration in ``path`` (one ``kind: Node`` document), or the defaults."""
    if path is None:
        return NodeSpec()
    if path.is_dir():
        raise ConfigError(f"{path} is a folder: -c/--config takes the node configuration file")
    if not path.is_file():
        raise ConfigError(f"{path}: no such configuration file")
    docs = load_documents(path.read_text(), source=path.name, base_dir=path.parent)
    nodes = [d for d in docs if isinstance(d, NodeDoc)]
    if len(nodes) != 1 or len(docs) != 1:
        raise ConfigError(
            f"{path}: expected exactly one document of kind Node, found "
            f"{', '.join(d.kind for d in docs) or 'none'}"
        )
    spec = nodes[0].spec
    if spec.fleet is not None:
        # Refused rather than ignored: a setting that silently does nothing misleads.
        raise ConfigError(
            f"{path}: spec.fleet: a running node does not load a Fleet (its simulated GPUs "
            "run no workers). Remove 'fleet' from this file; to plan against the Fleet, run "
            f"'gpuvisor plan --fleet {spec.fleet} -f MANIFESTS'",
            field="spec.fleet",
        )
    return spec


_GRACEFUL_SHUTDOWN = 10  # seconds the server gives open requests once it is told to stop
_QUEUED_GRACE = 8.0  # of which queued requests may still start: the rest are answered 503
_RUNNING_GRACE = 9.5  # and running ones may finish: the rest are answered 503 too


async def _drain_when_stopping(server: uvicorn.Server, node: Node) -> None:
    """Once the server is told to stop, give queued requests ``_QUEUED_GRACE`` seconds and
    running ones ``_RUNNING_GRACE``, and answer the rest with 503: past its graceful timeout
    the server cancels open requests, which would answer them with a bare 500."""
    while not server.should_exit:
        await asyncio.sleep(0.1)
    node.begin_shutdown(_QUEUED_GRACE, _RUNNING_GRACE)


def _prepare_state(state_dir: Path, db_url: str, demo: bool) -> tuple[str | None, DemoState | None]:
    try:
        store = Store(db_url)
    except SQLAlchemyError as exc:
        # what check_database_url cannot see: a server that does not answer, a bad password
        shown = make_url(db_url).render_as_string(hide_password=True)
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise ConfigError(
            f"cannot open the database {shown}: {reason} (check --db, or the node's --state)"
        ) from None
    try:
        keys = KeyRing(store)
        admin_secret = keys.ensure_admin_key(state_dir)
        demo_state = prepare_demo(state_dir, store, keys) if demo else None
    finally:
        store.close()
    return admin_secret, demo_state


async def serve_node(
    host: str,
    port: int,
    state: str | None,
    config: Path | None,
    db: str | None,
    demo: bool | None,
    log_level: str,
    log_format: str,
    console: Console,
) -> int:
    """Run a node until it is stopped (SIGINT/SIGTERM); return the process exit code.
    Raises ConfigError, before anything is written, for a node file, state directory or
    database it cannot use."""
    configure_logging(log_level, log_format)
    raise_open_file_limit()
    spec = load_node_config(config)
    # Before anything is written, each refused in one line rather than from inside the
    # server's start-up: a database URL that opening would create or fail on, a port in use,
    # a node file that asks for a GPU this host does not have.
    # absolute: the banner's commands are for other terminals, in other folders
    state_dir = resolve_state_dir(state).resolve()
    check_state_dir(state_dir)
    if db is not None:
        check_database_url(db)
    check_port_free(host, port)
    # a node already running on this state directory is refused first (then it exists)
    early = lock_state_dir(state_dir) if state_dir.is_dir() else None
    db_lock: HeldLock | None = None
    try:
        # and a node already running on the database (another state directory's, say)
        db_lock = lock_database(db) if db is not None else None
        topology = await asyncio.to_thread(discover, spec)
    except BaseException:
        if early is not None:
            os.close(early)
        if db_lock is not None:
            db_lock.close()
        raise
    make_state_dir(state_dir)
    lock = early if early is not None else lock_state_dir(state_dir)
    watching: asyncio.Task[None] | None = None
    try:
        db_url = db or default_url(state_dir)
        if db_lock is None:
            db_lock = lock_database(db_url)
        use_demo = demo if demo is not None else config is None
        started = time.monotonic()
        with console.status(
            "Preparing the state directory" + (" and building the demo models" if use_demo else "")
        ):
            admin_secret, demo_state = await asyncio.to_thread(
                _prepare_state, state_dir, db_url, use_demo
            )
        node = Node(
            NodeOptions(
                spec=spec,
                state_dir=state_dir,
                db_url=db_url,
                host=host,
                port=port,
                topology=topology,
            )
        )
        with console.status(
            "Starting the node: discovering devices, starting workers, loading models"
        ):
            try:
                await node.start()
            except BaseException:
                await node.stop()
                if admin_secret:  # made just now: its only showing
                    _print_admin_key(console, state_dir, admin_secret)
                raise
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(node),  # started already; stopped when the server stops
                host=host,
                port=port,
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN,
                lifespan="on",
                http=http_protocol(),  # uvicorn's own, closing connections that send no request
            )
        )
        serving = asyncio.create_task(server.serve())
        watching = asyncio.create_task(_drain_when_stopping(server, node))
        with console.status("Loading models"):
            while not server.started and not serving.done():
                await asyncio.sleep(0.05)
            if serving.done():
                with contextlib.suppress(BaseException):
                    await serving
                await node.stop()
                return 1
            not_ready = await node.wait_until_loaded(timeout=spec.workers.start_timeout)
        if server.should_exit:  # stopped while it loaded: it is not serving, say nothing
            await serving
            return 0
        _print_banner(
            console,
            node,
            host,
            port,
            state_dir,
            admin_secret,
            demo_state,
            time.monotonic() - started,
        )
        for s in not_ready:
            console.print(
                f"[yellow]slice {s.id} is {s.state}:[/yellow] {escape(s.reason)}",
                highlight=False,
                soft_wrap=True,
            )
        # The server's shutdown stops the node (uvicorn re-raises SIGTERM once it has stopped,
        # so nothing after this line runs then).
        await serving
        return 0
    finally:
        if watching is not None:
            watching.cancel()
        os.close(lock)
        if db_lock is not None:
            db_lock.close()


def _key_status(keys: KeyRing, secret: str) -> str:
    """ "" for a key that works, else why not (looked up by id: showing a key is not using it)."""
    key_id = claimed_key_id(secret)
    info = keys.get(key_id) if key_id else None
    if info is None:
        return "(no longer known to this node)"
    if info.revoked_at is not None:
        return f"(gvk_{info.id}, revoked)"
    if info.expires_at is not None and info.expires_at <= datetime.now(UTC):
        return f"(gvk_{info.id}, expired)"
    return ""


def _print_admin_key(console: Console, state_dir: Path, secret: str) -> None:
    console.print(
        f"\nadmin key (shown once; also in {admin_key_path(state_dir)}, mode 0600):\n  {secret}",
        highlight=False,
        soft_wrap=True,
    )


def _cli_flags(base: str, state_dir: Path) -> str:
    """The options a `gpuvisor` command in another shell needs to reach this node with its
    admin key: ``--url`` and ``--state`` where they are not the defaults, else nothing."""
    flags = ""
    if base != DEFAULT_URL:
        flags += f" --url {base}"
    if state_dir.expanduser().resolve() != Path(DEFAULT_STATE).expanduser().resolve():
        flags += f" --state {shlex.quote(str(state_dir.absolute()))}"
    return flags


def _print_demo_keys_elsewhere(console: Console, demo: DemoState) -> None:
    """The demo is in the database, but its keys are not in this state directory: the file
    was deleted, or another node (another state directory) applied the demo."""
    where = demo.keys_written_to
    gone = "" if where.exists() else ", which no longer exists"
    console.print(
        f"\n[bold]demo tenants[/bold]: the demo's keys were written to {escape(str(where))}{gone} "
        "when it was applied to this database. Create new ones with `gpuvisor keys create "
        "--tenant retail` (and analytics, support).",
        highlight=False,
        soft_wrap=True,
    )


def _print_banner(
    console: Console,
    node: Node,
    host: str,
    port: int,
    state_dir: Path,
    admin_secret: str | None,
    demo: DemoState | None,
    seconds: float,
) -> None:
    base = f"http://{host}:{port}"
    assert node.controller is not None
    ready = sum(1 for s in node.controller.slices.values() if s.state == "Ready")
    console.print(
        f"\n[bold green]gpuvisor {__version__} is serving[/bold green] on {base} "
        f"(ready in {seconds:.1f}s, {ready}/{len(node.controller.slices)} slices ready)",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"  inference (KServe v2 / Triton client): {base}/v2\n"
        f"  admin API: {base}/api/v1   OpenAPI: {base}/docs\n"
        f"  metrics:   {base}/metrics   dashboard: {base}/ui (sign in with a key)",
        highlight=False,
        soft_wrap=True,
    )
    for device in node.topology.devices:
        console.print(
            f"  device {device.id}: {device.model} ({device.kind})", highlight=False, soft_wrap=True
        )
    if admin_secret:
        _print_admin_key(console, state_dir, admin_secret)
    else:
        path = admin_key_path(state_dir)
        missing = (
            ""
            if read_admin_key(state_dir)
            else (
                " [bold red]is missing or empty[/bold red]: the database holds a valid admin key, so "
                "no new one is made. Use another admin key (--key), or see docs/operations.md, Keys"
            )
        )
        console.print(f"\nadmin key: {escape(str(path))}{missing}", highlight=False, soft_wrap=True)
    if demo is None:
        return
    assert node.keys is not None
    keys = demo.tenant_keys()
    if not keys:
        _print_demo_keys_elsewhere(console, demo)
        return
    # Shown in a terminal only: a node whose output goes to a log or a journal keeps them in
    # the file (mode 0600) alone.
    shown = console.is_terminal
    console.print(
        "\n[bold]demo tenants[/bold] (keys "
        + ("also " if shown else "")
        + f"in {escape(str(demo.keys_file))}"
        + ("" if shown else ", not printed when the output is not a terminal")
        + "):",
        highlight=False,
        soft_wrap=True,
    )
    # the demo's tenants only: deployments applied since are the operator's, not the demo's
    demo_slices = (s for s in node.controller.slices.values() if s.tenant in keys)
    for s in sorted(demo_slices, key=lambda s: s.id):
        console.print(
            f"  {s.tenant:10} {s.deployment:16} {s.state:8} {s.profile} ({s.latency_class})",
            highlight=False,
            soft_wrap=True,
        )
    for tenant, key in sorted(keys.items()):
        status = _key_status(node.keys, key)
        console.print(
            f"  {tenant:10} key {key if shown and not status else status or 'in the file'}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    if shown:
        retail, analytics, setup = keys.get("retail", ""), keys.get("analytics", ""), ""
    else:
        retail, analytics = "$RETAIL_KEY", "$ANALYTICS_KEY"
        read = "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])"
        setup = "".join(
            f"  export {name.upper()}_KEY=$(python3 -c '{read}' "
            f"{shlex.quote(str(demo.keys_file))} {name})\n"
            for name in ("analytics", "retail")
        )
    if sys.prefix != sys.base_prefix:  # in a virtual environment: other terminals need it too
        activate = shlex.quote(str(Path(sys.prefix) / "bin" / "activate"))
        setup = f"  . {activate}   # in another terminal\n" + setup
    retail_py = repr(retail) if shown else 'os.environ["RETAIL_KEY"]'
    features = ",".join(["0.5"] * 16)
    flags = _cli_flags(base, state_dir)
    commands = "\n".join(
        f"  gpuvisor get {kind}{flags}" for kind in ("deployments", "devices", "slices")
    )
    console.print("\n[bold]try it[/bold]")
    console.print(
        f"""
{setup}  curl -s -H "Authorization: Bearer {analytics}" {base}/v2/models/basket-scorer/infer \\
    -d '{{"inputs":[{{"name":"features","shape":[1,16],"datatype":"FP32","data":[{features}]}}]}}'

  python - <<'PY'
import os, numpy as np, tritonclient.http as http
client = http.InferenceServerClient("{host}:{port}")
image = http.InferInput("image", [1, 3, 32, 32], "FP32")
image.set_data_from_numpy(np.random.rand(1, 3, 32, 32).astype(np.float32))
result = client.infer("shelf-detector", [image], headers={{"Authorization": "Bearer " + {retail_py}}})
print("shelf class:", result.as_numpy("probabilities").argmax())
PY

{commands}
""",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
