"""Every name the partition modules export exists, and each module says what it is for."""

from __future__ import annotations

import importlib

import pytest

MODULES = [
    "export",
    "fleet",
    "fragmentation",
    "mig",
    "nvml_geometry",
    "placement",
    "planner",
    "report",
    "workloads",
]


@pytest.mark.parametrize("module_name", MODULES)
def test_all_names_exist(module_name: str) -> None:
    module = importlib.import_module(f"gpuvisor.partition.{module_name}")
    assert module.__doc__
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []
