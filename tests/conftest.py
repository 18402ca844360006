"""Shared fixtures: the reference data in ../shared, and the FHIR engine on SQLite and PostgreSQL.

Engine tests take the `backend` parameter; PostgreSQL gets a fresh database with a unique name
on 127.0.0.1:5432 (user postgres) that is dropped afterwards. With CI=true the PostgreSQL run
must happen: an unreachable server fails the run instead of skipping it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from access_tokens import bearer
from cityhealth.config import Settings
from cityhealth.db import Database
from cityhealth.fhir.definitions import Definitions, get_definitions
from cityhealth.fhir.engine import FhirEngine
from cityhealth.migrate import upgrade

SHARED = Path(os.environ.get("CITYHEALTH_SHARED", Path(__file__).resolve().parents[2] / "shared"))
PG_ADMIN = os.environ.get("CITYHEALTH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"reference data not found at {SHARED}; set CITYHEALTH_SHARED")
    return SHARED


@pytest.fixture(scope="session")
def definitions() -> Definitions:
    return get_definitions()


def _postgres_database() -> Iterator[str]:
    name = f"cityhealth_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is required in CI and is not reachable: {error}")
        pytest.skip(f"PostgreSQL not reachable: {error}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield (
            PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
            + f"/{name}"
        )
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_database_url(backend: str, tmp_dir: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_dir / 'cityhealth.db'}"
    else:
        yield from _postgres_database()


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def database(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    for url in make_database_url(backend, tmp_path_factory.mktemp(backend)):
        upgrade(url)
        db = Database(url, pool_size=4)
        yield db
        db.dispose()


@pytest.fixture(scope="module")
def settings(database: Database, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        database_url=str(database.url.render_as_string(hide_password=False)),
        keys_dir=tmp_path_factory.mktemp("keys"),
    )


@pytest.fixture(scope="module")
def engine(database: Database, settings: Settings, definitions: Definitions) -> FhirEngine:
    return FhirEngine(database, definitions, settings)


@pytest.fixture(scope="module")
def client(database: Database, settings: Settings) -> Iterator[TestClient]:
    """The application, called as the platform's own client (a `system/*.*` token)."""
    from cityhealth.app import create_app

    app = create_app(settings, database)
    with TestClient(app, raise_server_exceptions=False, headers=bearer(app)) as test_client:
        yield test_client
