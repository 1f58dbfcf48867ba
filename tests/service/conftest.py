"""Fixtures of the service tests: the tiny random models, an in-process app with tokens, a throwaway PostgreSQL
database, and real ``flywheel serve`` processes on free loopback ports (always stopped)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from svc_helpers import PG_ADMIN, Server, make_config, start_api, tiny


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """``policy`` and ``policy2`` (another seed: another version) and ``reward``: tiny random models."""
    root = tmp_path_factory.mktemp("tiny-service-models")
    tiny.build_policy(root / "policy")
    tiny.build_policy(root / "policy2", seed=1)
    tiny.build_reward(root / "reward")
    return root


@pytest.fixture
def api(tmp_path, tiny_models):
    with start_api(make_config(tmp_path, tiny_models)) as a:
        yield a


NO_POSTGRES = "FLYWHEEL_TEST_NO_POSTGRES"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """A fresh feedback store URL: a SQLite file, or a throwaway PostgreSQL database dropped afterwards.

    PostgreSQL must be reachable (127.0.0.1:5432, user postgres, trust auth; CI runs one): an unreachable server
    fails the test. Only an explicit ``FLYWHEEL_TEST_NO_POSTGRES=1`` skips the PostgreSQL cases, and says so."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    if os.environ.get(NO_POSTGRES) == "1":
        pytest.skip(f"{NO_POSTGRES}=1: the PostgreSQL cases are opted out; the store ran on SQLite only")
    import sqlalchemy as sa

    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any way the server is unreachable
        admin.dispose()
        pytest.fail(
            f"PostgreSQL at 127.0.0.1:5432 is unreachable ({type(exc).__name__}: {exc}); start it, or set "
            f"{NO_POSTGRES}=1 to run the store tests on SQLite only"
        )
    name = f"flywheel_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def servers():
    """Start servers with ``servers(ws, args)``; every one is stopped at the end, pass or fail."""
    started: list[Server] = []

    def start(ws: Path, args: list[str], **kw) -> Server:
        srv = Server(ws, args, **kw)
        started.append(srv)
        return srv.start()

    yield start
    for srv in started:
        srv.stop()
