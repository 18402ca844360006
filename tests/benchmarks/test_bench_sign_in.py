"""How the benchmarks sign in: a system client registered with the CLI gets an access token
from /oauth/token with HTTP Basic client authentication, and the load generators send it on
every request (the asyncio client, and wrk through crud_mix.lua). And what the CRUD mix reports
of its database connections: what they wait for."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import psycopg
import pytest
from fastapi.testclient import TestClient

from cityhealth.config import Settings
from cityhealth.db import Database
from cityhealth.security.visibility import HOLDER

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str) -> ModuleType:
    """A benchmark module; they import each other by name (`from common import …`)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


common = _load("common")
crud_mix = _load("crud_mix")
unsecured = _load("unsecured")


def register(url: str, cwd: Path, client_id: str, organization: str | None) -> str:
    """Register the client as `Server.sign_in` does; its secret, read from the CLI's output."""
    done = subprocess.run(
        common.client_create_command(client_id, organization),
        cwd=cwd,
        env={**os.environ, "CITYHEALTH_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    secret: str = common.client_secret(done.stdout)
    return secret


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, str, Path]]:
    """The application on a SQLite database of its own (the CLI migrates it)."""
    from cityhealth.app import create_app

    folder = tmp_path_factory.mktemp("bench-sign-in")
    url = f"sqlite:///{folder / 'cityhealth.db'}"
    register(url, folder, "bench-first", None)  # creates the schema before the app opens it
    db = Database(url, pool_size=4)
    app = create_app(Settings(database_url=url, keys_dir=folder / "keys"), db)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, url, folder
    db.dispose()


def sign_in(platform: tuple[TestClient, str, Path], client_id: str, org: str | None) -> str:
    client, url, folder = platform
    headers, body = common.token_request(client_id, register(url, folder, client_id, org))
    answer = client.post("/oauth/token", content=body, headers=headers)
    assert answer.status_code == 200, answer.text
    token: str = common.read_token(answer.content)
    return token


PATIENT = {"resourceType": "Patient", "name": [{"text": "马晓燕"}], "gender": "female"}


def holders(resource: dict[str, Any]) -> list[str]:
    tags = resource.get("meta", {}).get("tag", [])
    return [t["code"] for t in tags if t.get("system") == HOLDER]


def test_a_hospital_client_signs_in_and_holds_what_it_writes(
    platform: tuple[TestClient, str, Path],
) -> None:
    client = platform[0]
    hospital = crud_mix.CALLERS["hospital"]
    token = sign_in(platform, "bench-hospital-1", hospital)
    fhir = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}

    assert client.post("/fhir/Patient", content=orjson.dumps(PATIENT)).status_code == 401
    created = client.post("/fhir/Patient", content=orjson.dumps(PATIENT), headers=fhir)
    assert created.status_code == 201, created.text
    assert holders(created.json()) == [hospital]
    read = client.get(f"/fhir/Patient/{created.json()['id']}", headers=fhir)
    assert read.status_code == 200 and read.content == created.content


def test_a_platform_client_stamps_no_holder(platform: tuple[TestClient, str, Path]) -> None:
    client = platform[0]
    assert crud_mix.CALLERS["platform"] is None
    token = sign_in(platform, "bench-platform-1", None)
    fhir = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    created = client.post("/fhir/Patient", content=orjson.dumps(PATIENT), headers=fhir)
    assert created.status_code == 201, created.text
    assert holders(created.json()) == []


def test_the_unsecured_baseline_serves_without_token_rules_or_audit(tmp_path: Path) -> None:
    """`crud_mix.py --as unsecured`: the same application, its security taken out."""
    url = f"sqlite:///{tmp_path / 'cityhealth.db'}"
    register(url, tmp_path, "bench-unsecured", None)  # creates the schema
    db = Database(url, pool_size=4)
    app = unsecured.create_app(Settings(database_url=url, keys_dir=tmp_path / "keys"), db)
    fhir = {"Content-Type": "application/fhir+json"}
    with TestClient(app, raise_server_exceptions=False) as client:
        created = client.post("/fhir/Patient", content=orjson.dumps(PATIENT), headers=fhir)
        assert created.status_code == 201, created.text
        assert holders(created.json()) == []
        found = client.get("/fhir/Patient", params={"_id": created.json()["id"]})
        assert found.status_code == 200 and found.json()["total"] == 1
    with db.read() as conn:
        rows = conn.exec_driver_sql("SELECT type, count(*) FROM resource GROUP BY type").all()
    db.dispose()
    assert dict(rows) == {"Patient": 1}  # and no AuditEvent


def test_a_wrong_secret_gets_no_token(platform: tuple[TestClient, str, Path]) -> None:
    client, url, folder = platform
    register(url, folder, "bench-wrong-secret", None)
    headers, body = common.token_request("bench-wrong-secret", "not-the-secret")
    answer = client.post("/oauth/token", content=body, headers=headers)
    assert answer.status_code == 401
    with pytest.raises(RuntimeError, match="no bearer token"):
        common.read_token(answer.content)


def test_a_cli_output_without_secret_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no client_secret"):
        common.client_secret("client his-1 (public) created\n")
    assert common.client_secret("created\nclient_secret: a-b_c\nStore it now\n") == "a-b_c"


async def _heads_received(port_and_heads: list[Any], answers: int) -> None:
    """A server that records each request head and answers 401 with an empty body."""
    heads: list[str] = port_and_heads[1]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                heads.append(head)
                for line in head.split("\r\n"):
                    name, _, value = line.partition(":")
                    if name.lower() == "content-length":
                        await reader.readexactly(int(value))
                writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port_and_heads[0] = server.sockets[0].getsockname()[1]
    try:
        while len(heads) < answers:
            await asyncio.sleep(0.01)
    finally:
        server.close()


def authorization_of(head: str) -> list[str]:
    return [
        line.partition(":")[2].strip()
        for line in head.split("\r\n")
        if line.partition(":")[0].lower() == "authorization"
    ]


def test_the_asyncio_client_sends_the_token_on_every_request() -> None:
    async def scenario() -> list[str]:
        port_and_heads: list[Any] = [0, []]
        serving = asyncio.create_task(_heads_received(port_and_heads, 3))
        while not port_and_heads[0]:
            await asyncio.sleep(0.01)
        http = crud_mix.RawHttp("127.0.0.1", port_and_heads[0], "Bearer tok.en-1")
        answers = [
            await http.request("POST", "/fhir/Patient", orjson.dumps(PATIENT)),
            await http.request("GET", "/fhir/Patient/1"),
            await http.request("DELETE", "/fhir/Patient/1"),
        ]
        await http.close()
        await serving
        assert [a.status for a in answers] == [401, 401, 401]
        heads: list[str] = port_and_heads[1]
        return heads

    heads = asyncio.run(scenario())
    assert [h.split(" ", 2)[:2] for h in heads] == [
        ["POST", "/fhir/Patient"],
        ["GET", "/fhir/Patient/1"],
        ["DELETE", "/fhir/Patient/1"],
    ]
    assert [authorization_of(h) for h in heads] == [["Bearer tok.en-1"]] * 3


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (apt-get install wrk)")
def test_wrk_sends_the_token_on_every_request(tmp_path: Path) -> None:
    templates = tmp_path / "templates.lua"
    crud_mix.write_lua_templates(crud_mix.load_templates(), templates, "Bearer tok.en-2")

    async def scenario() -> list[str]:
        port_and_heads: list[Any] = [0, []]
        serving = asyncio.create_task(_heads_received(port_and_heads, 20))
        while not port_and_heads[0]:
            await asyncio.sleep(0.01)
        wrk = await asyncio.create_subprocess_exec(
            *("wrk", "-t", "1", "-c", "1", "-d", "1s", "-s", str(crud_mix.LUA_SCRIPT)),
            *(f"http://127.0.0.1:{port_and_heads[0]}", "--", str(templates), "delete", "r1"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await wrk.communicate()
        assert wrk.returncode == 0, err.decode()
        assert "CRUDMIX all" in out.decode()
        await asyncio.wait_for(serving, 10)
        heads: list[str] = port_and_heads[1]
        return heads

    heads = asyncio.run(scenario())
    # Every create is answered 401, so each iteration starts over with a create.
    assert {h.split(" ", 2)[0] + " " + h.split(" ", 2)[1] for h in heads} == {"POST /fhir/Patient"}
    assert all(authorization_of(h) == ["Bearer tok.en-2"] for h in heads)


PG_ADMIN = os.environ.get("CITYHEALTH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (required when CI=true)."""
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
        yield name
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_waits_show_a_connection_queued_on_a_lock(pg_database: str) -> None:
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{pg_database}"
    with psycopg.connect(url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(7220419)")

        def wait_for_the_lock() -> None:
            with psycopg.connect(url, autocommit=True) as waiter:
                waiter.execute("SELECT pg_advisory_lock(7220419)")

        queued = threading.Thread(target=wait_for_the_lock)
        queued.start()
        deadline = time.monotonic() + 10
        sql = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        while holder.execute(sql).fetchone() != (1,) and time.monotonic() < deadline:
            time.sleep(0.01)
        waits = common.PostgresWaits(PG_ADMIN, pg_database, interval=0.01)
        time.sleep(0.3)
        seen = waits.stop()
        holder.execute("SELECT pg_advisory_unlock(7220419)")
        queued.join(10)
    assert waits.samples >= 10
    # One connection waited all along; the holder was idle, the sampler's own is elsewhere.
    assert seen == {"Lock:advisory": 1.0}
