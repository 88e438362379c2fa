"""Keep MIG geometries read from a (fake) driver from leaking between tests."""

from __future__ import annotations

import pytest

from gpuvisor.partition import mig


@pytest.fixture(autouse=True)
def _tables_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mig, "_DRIVER_GEOMETRIES", {})
