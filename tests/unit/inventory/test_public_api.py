"""Every name the inventory modules export exists, and the package re-exports the main ones."""

from __future__ import annotations

import importlib

import pytest

import gpuvisor.inventory

MODULES = ["cpu", "device", "discovery", "nvml", "simulated"]


@pytest.mark.parametrize("module_name", MODULES)
def test_all_names_exist(module_name: str) -> None:
    module = importlib.import_module(f"gpuvisor.inventory.{module_name}")
    assert module.__doc__
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []


def test_package_exports_resolve_to_the_defining_modules() -> None:
    for name in gpuvisor.inventory.__all__:
        exported = getattr(gpuvisor.inventory, name)
        defining = [
            m for m in MODULES if name in importlib.import_module(f"gpuvisor.inventory.{m}").__all__
        ]
        assert len(defining) == 1, name
        assert exported is getattr(
            importlib.import_module(f"gpuvisor.inventory.{defining[0]}"), name
        )
