"""A Store for key tests, on each database the root conftest's ``db_url`` offers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gpuvisor.store.repo import Store


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    with Store(db_url) as opened:
        yield opened
