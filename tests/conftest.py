"""Database URLs for every suite that touches the store: a SQLite file in tmp_path, and a
fresh PostgreSQL schema when $GPUVISOR_TEST_PG_URL is set (``.ci/run`` starts a server).
And each test's logging left as it found it."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from gpuvisor.store.db import default_url, make_engine

PG_URL_ENV = "GPUVISOR_TEST_PG_URL"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """A test that runs `gpuvisor up` in this process configures the root logger as the node
    does (INFO, to stderr): put it back, so that later tests' CLI output holds no log lines."""
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            # pytest's own capture handlers come and go with each phase: pytest removes them
            if handler not in before and not type(handler).__module__.startswith("_pytest"):
                root.removeHandler(handler)
        root.setLevel(level)


def postgres_schema_url(base_url: str, schema: str) -> str:
    """Return ``base_url`` with every connection's search_path set to ``schema``."""
    url = make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


@contextlib.contextmanager
def fresh_postgres_schema() -> Iterator[str]:
    """Yield a URL to a new, empty schema on $GPUVISOR_TEST_PG_URL's server (skips without
    one), and drop the schema afterwards."""
    base_url = os.environ.get(PG_URL_ENV)
    if not base_url:
        pytest.skip(f"{PG_URL_ENV} is not set")
    schema = f"gv_test_{uuid.uuid4().hex[:12]}"
    admin = make_engine(base_url)
    with admin.begin() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield postgres_schema_url(base_url, schema)
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A URL to a fresh, empty schema on the PostgreSQL server at $GPUVISOR_TEST_PG_URL."""
    with fresh_postgres_schema() as url:
        yield url


@pytest.fixture
def other_pg_url() -> Iterator[str]:
    """Another fresh, empty schema on the same server, beside ``pg_url``'s."""
    with fresh_postgres_schema() as url:
        yield url


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def sqlite_url(state_dir: Path) -> str:
    """A URL to a SQLite file (in ``state_dir``) that does not exist yet."""
    return default_url(state_dir)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs on SQLite, and on PostgreSQL when $GPUVISOR_TEST_PG_URL is set."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(name))


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def node_db(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """For a module's node (``NodeProcess.db``): None (SQLite in its state directory), then a
    fresh PostgreSQL schema when $GPUVISOR_TEST_PG_URL is set."""
    if request.param == "sqlite":
        yield None
        return
    with fresh_postgres_schema() as url:
        yield url
