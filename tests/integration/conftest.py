"""Fixtures that run a real node (`gpuvisor up` as a child process on a free loopback port)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuvisor.launch import NodeProcess


@pytest.fixture(scope="module")
def demo_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A node serving the demo, shared by the tests of one module."""
    node = NodeProcess(state_dir=tmp_path_factory.mktemp("node-state"))
    node.start(timeout=120)
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def models_dir(demo_node: NodeProcess) -> Path:
    return demo_node.state_dir / "demo" / "models"


@pytest.fixture
def env(demo_node: NodeProcess) -> dict[str, str]:
    """The environment in which the CLI (run in this process) talks to the demo node with
    its admin key, on a terminal wide enough that no table wraps."""
    return {
        "GPUVISOR_URL": demo_node.url,
        "GPUVISOR_STATE": str(demo_node.state_dir),
        "COLUMNS": "250",
    }
