"""CRUD mix over HTTP: the CRUD scenario of the HealthSamurai FHIR-server benchmark
(fhir-server-performance-benchmark, k6/crud.js) against `cityhealth serve`.

One iteration creates nine linked resources (Patient, Location, Organization, Practitioner,
Encounter, Observation, MedicationRequest, Claim, ExplanationOfBenefit; seeds in seeds/), reads
each, updates each (one field changed, as crud.js does), then
- variant "delete": deletes each in reverse order — HealthSamurai's proportions, C:R:U:D 1:1:1:1;
- variant "search": searches each by its identifier (`Type?identifier=system|value`) instead —
  the issue's create/read/update/search, C:R:U:S 1:1:1:1.

Loaders: "asyncio" (this script; checks every answer: status, ETag, that the stored resource is
what was sent, that a read returns the bytes the create answered, that a search finds exactly
the updated resource) and "wrk" (Debian's wrk with crud_mix.lua: the same mix with lighter
checks, for when the Python client's own CPU holds the server back). With several workers,
both spread their keep-alive connections evenly over them (reconnecting, or restarting wrk,
until they are): the kernel alone often gives one worker most of them.

Both send the access token of a system client that the script registers with the CLI and signs
in with client credentials, as a hospital's system does: `--as hospital` (the default) is a
client of one hospital (an organization), whose access rules filter every read and search to
the records it holds or the patients it treats; `--as platform` is the platform's own client
(no organization), which sees everything. Both leave the audit trail of every request.
`--as unsecured` runs the same application with its security taken out (unsecured.py: no token
checked, no access rule, no AuditEvent), the baseline against which that security is measured.

    .venv/bin/python benchmarks/crud_mix.py            # the whole matrix, 7–9 minutes
    .venv/bin/python benchmarks/crud_mix.py --help
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import orjson
from common import (
    ACCESS_TOKEN_MINUTES,
    PG_ADMIN,
    SYSTEM_SCOPE,
    CpuWindow,
    RssSampler,
    Server,
    connection_owners,
    connections_per_process,
    cpu_seconds,
    print_header,
    profile_summary,
    start_profiles,
    wait_for_quiet,
)

HERE = Path(__file__).resolve().parent
LUA_SCRIPT = HERE / "crud_mix.lua"
ORDER = (
    "Patient",
    "Location",
    "Organization",
    "Practitioner",
    "Encounter",
    "Observation",
    "MedicationRequest",
    "Claim",
    "ExplanationOfBenefit",
)
SEED_FILES = {
    "Patient": "patient.json",
    "Location": "location.json",
    "Organization": "organization.json",
    "Practitioner": "practitioner.json",
    "Encounter": "encounter.json",
    "Observation": "observation.json",
    "MedicationRequest": "medication-request.json",
    "Claim": "claim.json",
    "ExplanationOfBenefit": "explanation-of-benefit.json",
}
#: Each created resource gets one more identifier, unique to its iteration, to be searched by.
RUN_SYSTEM = "https://fhir.cityhealth.example/sid/benchmark-run"
VARIANTS = {
    "delete": "create/read/update/delete 1:1:1:1 (HealthSamurai crud.js)",
    "search": "create/read/update/search-by-identifier 1:1:1:1 (the issue's mix)",
}
#: Who the load generators act as (`--as`): the organization of the system client, if any.
CALLERS = {
    "hospital": "Organization/bench-hospital",
    "platform": None,
    "unsecured": None,  # unsecured.py: the same engine without token, rules or audit
}
TARGET_RPS = 1100
TARGET_P99_MS = 50.0
OPERATIONS = ("create", "read", "update", "delete", "search")
CPU_USERS = ("client", "server", "postgres", "other")
_PLACEHOLDER = re.compile(r"@@(\w+)@@")


# -- the mix ------------------------------------------------------------------------------------
def _link(node: Any) -> Any:
    """References to the nine seed types point at placeholders filled in per iteration."""
    if isinstance(node, list):
        return [_link(item) for item in node]
    if not isinstance(node, dict):
        return node
    linked = {key: _link(value) for key, value in node.items()}
    target = str(linked.get("reference", "")).split("/")[0]
    if target in ORDER:
        linked["reference"] = f"{target}/@@{target}@@"
    return linked


def change(resource: dict[str, Any]) -> None:
    """Change one field, as crud.js's changeResource does."""
    now = datetime.now(UTC)
    rtype = resource["resourceType"]
    if rtype == "Encounter":
        resource["status"] = "in-progress" if resource.get("status") == "planned" else "planned"
    elif rtype in ("Location", "Organization"):
        resource["name"] = f"{resource['name']}-{int(now.timestamp() * 1000)}"
    elif rtype == "MedicationRequest":
        resource["status"] = "draft" if resource.get("status") == "on-hold" else "on-hold"
    elif rtype == "Observation":
        resource["issued"] = now.isoformat(timespec="milliseconds")
    elif rtype in ("Patient", "Practitioner"):
        resource["gender"] = "other" if resource.get("gender") == "unknown" else "unknown"
    else:
        resource["created"] = now.isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Templates:
    """JSON text per type with @@Type@@ (referenced ids) and @@KEY@@ (run identifier) holes;
    `update` also has @@ID@@ and crud.js's change already made (for wrk)."""

    create: dict[str, str]
    update: dict[str, str]


def load_templates() -> Templates:
    create, update = {}, {}
    for rtype in ORDER:
        seed = orjson.loads((HERE / "seeds" / SEED_FILES[rtype]).read_bytes())
        assert seed["resourceType"] == rtype
        template = _link(seed)
        template["identifier"] = [
            *template.get("identifier", []),
            {"system": RUN_SYSTEM, "value": "@@KEY@@"},
        ]
        create[rtype] = orjson.dumps(template).decode()
        updated = {"resourceType": rtype, "id": "@@ID@@", **copy.deepcopy(template)}
        change(updated)
        update[rtype] = orjson.dumps(updated).decode()
    return Templates(create, update)


def fill(template: str, values: dict[str, str]) -> bytes:
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template).encode()


def search_path(rtype: str, key: str) -> str:
    return f"/fhir/{rtype}?identifier={quote(f'{RUN_SYSTEM}|{key}', safe='')}"


# -- HTTP clients -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes


class Http(Protocol):
    async def request(self, method: str, path: str, body: bytes = b"") -> Answer: ...

    async def close(self) -> None: ...


class RawHttp:
    """HTTP/1.1 on one keep-alive connection: the least client CPU per request, so that the
    load generator leaves the shared cores to the server. Every request carries the
    `authorization` header."""

    def __init__(self, host: str, port: int, authorization: str) -> None:
        self.host, self.port = host, port
        self._common = (
            f"HTTP/1.1\r\nHost: {host}\r\nAccept: application/fhir+json\r\n"
            f"Authorization: {authorization}\r\n"
        )
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    @property
    def local_port(self) -> int | None:
        if self._writer is None:
            return None
        port: int = self._writer.get_extra_info("sockname")[1]
        return port

    async def request(self, method: str, path: str, body: bytes = b"") -> Answer:
        if self._writer is None:
            await self.connect()
        assert self._reader is not None and self._writer is not None
        head = f"{method} {path} {self._common}"
        if body:
            head += f"Content-Type: application/fhir+json\r\nContent-Length: {len(body)}\r\n"
        try:
            self._writer.write(head.encode() + b"\r\n" + body)
            raw = await self._reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name:
                    headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            data = await self._reader.readexactly(length) if length else b""
        except (OSError, asyncio.IncompleteReadError, ValueError):
            await self.close()
            raise
        return Answer(int(lines[0].split(" ", 2)[1]), headers, data)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class HttpxHttp:
    """The same requests through httpx (one pooled client), to compare the clients' costs."""

    def __init__(self, client: Any, authorization: str) -> None:
        self.client = client
        self.authorization = authorization

    async def request(self, method: str, path: str, body: bytes = b"") -> Answer:
        headers = {"Accept": "application/fhir+json", "Authorization": self.authorization}
        if body:
            headers["Content-Type"] = "application/fhir+json"
        answer = await self.client.request(method, path, content=body or None, headers=headers)
        return Answer(answer.status_code, dict(answer.headers), answer.content)

    async def close(self) -> None:
        return None


# -- figures ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Figures:
    count: int
    errors: int
    p50: float  # milliseconds
    p95: float
    p99: float
    max: float


def figures(latencies: list[float], errors: int) -> Figures:
    ordered = sorted(latencies)
    if not ordered:
        return Figures(0, errors, 0.0, 0.0, 0.0, 0.0)

    def rank(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, int(p * len(ordered) + 0.5) - 1))] * 1000

    return Figures(len(ordered), errors, rank(0.50), rank(0.95), rank(0.99), ordered[-1] * 1000)


@dataclass
class Recorder:
    """Latencies of successful requests and failures, inside the timed window only."""

    start: float = float("inf")
    end: float = float("inf")
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)

    def record(self, op: str, began: float, ended: float, error: str | None) -> None:
        if began < self.start or ended > self.end:
            return
        if error is None:
            self.latencies.setdefault(op, []).append(ended - began)
        else:
            self.errors[op] = self.errors.get(op, 0) + 1
            if len(self.samples) < 8:
                self.samples.append(f"{op}: {error}")

    def figures(self) -> dict[str, Figures]:
        seen = set(self.latencies) | set(self.errors)
        ops = [op for op in OPERATIONS if op in seen]
        result = {op: figures(self.latencies.get(op, []), self.errors.get(op, 0)) for op in ops}
        every = [x for values in self.latencies.values() for x in values]
        result["all"] = figures(every, sum(self.errors.values()))
        return result


@dataclass
class Run:
    database: str
    workers: int
    loader: str
    variant: str
    connections: int
    caller: str = "hospital"  # CALLERS
    seconds: float = 0.0
    ops: dict[str, Figures] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    waits: dict[str, float] = field(default_factory=dict)  # PostgresWaits.stop()
    rss: tuple[int, int, int] = (0, 0, 0)
    supervisor_rss: int = 0
    data: dict[str, int] = field(default_factory=dict)
    busy_before: float = 0.0
    sessions: int = 0  # PostgreSQL connections the server opened during the run
    spread: list[int] = field(default_factory=list)  # client connections per worker
    samples: list[str] = field(default_factory=list)
    profile: str = ""

    @property
    def rps(self) -> float:
        return self.ops["all"].count / self.seconds if self.seconds else 0.0

    def cpu_ms(self, user: str) -> float:
        """CPU milliseconds `user` spent per request: unlike throughput, hardly moved by what
        else runs on the machine."""
        requests = self.ops["all"].count
        cores = os.cpu_count() or 1
        return self.cpu.get(user, 0.0) * cores * self.seconds * 1000 / requests if requests else 0.0

    @property
    def met(self) -> bool:
        overall = self.ops["all"]
        return self.rps >= TARGET_RPS and overall.p99 <= TARGET_P99_MS and overall.errors == 0


# -- the asyncio loader -------------------------------------------------------------------------
def _without_meta(resource: Any) -> Any:
    return {k: v for k, v in resource.items() if k != "meta"} if isinstance(resource, dict) else 0


def _failure(rtype: str, answer: Answer, why: str) -> str:
    return f"{rtype} {answer.status} {why}: {answer.body[:200].decode(errors='replace')}"


async def iteration(
    http: Http, templates: Templates, key: str, variant: str, rec: Recorder, stop: asyncio.Event
) -> None:
    """One crud.js iteration with every answer checked; a failed create ends it."""
    ids: dict[str, str] = {"KEY": key}
    stored: dict[str, bytes] = {}

    async def call(
        op: str, rtype: str, request: Awaitable[Answer], check: Callable[[Answer], str]
    ) -> str:
        """Time one request and check its answer; the failure, or "" when it passed."""
        began = time.perf_counter()
        try:
            answer = await request
        except (OSError, asyncio.IncompleteReadError, ValueError) as lost:
            rec.record(op, began, time.perf_counter(), f"{rtype} {type(lost).__name__}")
            return "failed"
        ended = time.perf_counter()
        failure = check(answer)
        rec.record(op, began, ended, failure or None)
        return failure

    for rtype in ORDER:
        if stop.is_set():
            return
        sent = fill(templates.create[rtype], ids)

        def created(answer: Answer, rtype: str = rtype, sent: bytes = sent) -> str:
            if answer.status != 201:
                return _failure(rtype, answer, "create is not 201")
            body = orjson.loads(answer.body)
            rid = body.get("id", "")
            if f"/{rtype}/{rid}/_history/1" not in answer.headers.get("location", ""):
                return _failure(rtype, answer, "no Location of version 1")
            if {**_without_meta(body), "id": None} != {**orjson.loads(sent), "id": None}:
                return _failure(rtype, answer, "stored resource differs from the one sent")
            ids[rtype], stored[rtype] = rid, answer.body
            return ""

        if await call("create", rtype, http.request("POST", f"/fhir/{rtype}", sent), created):
            return
    for rtype in ORDER:
        if stop.is_set():
            return

        def read(answer: Answer, rtype: str = rtype) -> str:
            if answer.status != 200 or answer.headers.get("etag") != 'W/"1"':
                return _failure(rtype, answer, 'read is not 200 with ETag W/"1"')
            if answer.body != stored[rtype]:
                return _failure(rtype, answer, "read differs from what the create returned")
            return ""

        await call("read", rtype, http.request("GET", f"/fhir/{rtype}/{ids[rtype]}"), read)
    for rtype in ORDER:
        if stop.is_set():
            return
        resource = orjson.loads(stored[rtype])
        change(resource)
        sent = orjson.dumps(resource)

        def updated(answer: Answer, rtype: str = rtype, resource: Any = resource) -> str:
            if answer.status != 200 or answer.headers.get("etag") != 'W/"2"':
                return _failure(rtype, answer, 'update is not 200 with ETag W/"2"')
            if _without_meta(orjson.loads(answer.body)) != _without_meta(resource):
                return _failure(rtype, answer, "updated resource differs from the one sent")
            stored[rtype] = answer.body
            return ""

        path = f"/fhir/{rtype}/{ids[rtype]}"
        await call("update", rtype, http.request("PUT", path, sent), updated)
    for rtype in reversed(ORDER) if variant == "delete" else ORDER:
        if stop.is_set():
            return
        if variant == "delete":

            def deleted(answer: Answer, rtype: str = rtype) -> str:
                ok = answer.status in (200, 204)
                return "" if ok else _failure(rtype, answer, "delete is not 200/204")

            path = f"/fhir/{rtype}/{ids[rtype]}"
            await call("delete", rtype, http.request("DELETE", path), deleted)
        else:

            def found(answer: Answer, rtype: str = rtype) -> str:
                bundle = orjson.loads(answer.body) if answer.status == 200 else {}
                entries = bundle.get("entry", [])
                if bundle.get("total") != 1 or len(entries) != 1:
                    return _failure(rtype, answer, "search does not find exactly one")
                if entries[0].get("resource") != orjson.loads(stored[rtype]):
                    return _failure(rtype, answer, "search finds another version")
                return ""

            path = search_path(rtype, key)
            await call("search", rtype, http.request("GET", path), found)


def _fair_share(connections: int, workers: int) -> int:
    return -(-connections // workers)


async def balance_connections(users: list[RawHttp], server: Server) -> None:
    """Reconnect until each worker serves its fair share of the connections: the kernel hands
    keep-alive connections to uvicorn's workers unevenly (seen: 14 and 2), which would leave
    one worker idle and measure the luck of the draw."""
    await asyncio.gather(*(user.connect() for user in users))
    fair = _fair_share(len(users), len(server.worker_pids))
    for _ in range(100):
        await asyncio.sleep(0.05)  # let the workers accept
        owners = connection_owners(server.port, server.worker_pids)
        by_worker: dict[int | None, list[RawHttp]] = {}
        for user in users:
            port = user.local_port
            by_worker.setdefault(owners.get(port) if port else None, []).append(user)
        surplus = [u for owner, us in by_worker.items() if owner for u in us[fair:]]
        if not surplus and None not in by_worker:
            return
        for user in surplus:
            await user.close()
            await user.connect()


async def asyncio_load(
    server: Server,
    templates: Templates,
    variant: str,
    connections: int,
    warmup: float,
    seconds: float,
    client: str,
    balance: bool,
    window: Callable[[], Callable[[], None]],
) -> Recorder:
    """Run `connections` virtual users; `window()` is called when the timed part starts and
    returns what to call when it ends."""
    rec, stop, run = Recorder(), asyncio.Event(), uuid.uuid4().hex[:8]
    pool: Any = None
    if client == "httpx":
        import httpx

        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        pool = httpx.AsyncClient(base_url=server.base, limits=limits, timeout=60)
    authorization = server.authorization
    raw = (
        [RawHttp("127.0.0.1", server.port, authorization) for _ in range(connections)]
        if pool is None
        else []
    )
    users: list[Http] = (
        [*raw] if raw else [HttpxHttp(pool, authorization) for _ in range(connections)]
    )
    if raw and balance:
        await balance_connections(raw, server)

    async def user(n: int) -> None:
        count = 0
        while not stop.is_set():
            count += 1
            await iteration(users[n], templates, f"{run}-{n}-{count}", variant, rec, stop)

    tasks = [asyncio.create_task(user(n)) for n in range(connections)]
    await asyncio.sleep(warmup)
    finish = window()
    rec.start = time.perf_counter()
    rec.end = rec.start + seconds
    await asyncio.sleep(seconds)
    finish()
    stop.set()
    await asyncio.wait(tasks, timeout=60)
    for http in users:
        await http.close()
    if pool is not None:
        await pool.aclose()
    return rec


def run_asyncio(server: Server, templates: Templates, run: Run, args: argparse.Namespace) -> None:
    profiles: list[subprocess.Popen[bytes]] = []
    profile_dir = Path(args.profile) / f"{run.database}-w{run.workers}-{run.variant}"
    shares: dict[str, float] = {}

    def window() -> Callable[[], None]:
        run.spread = connections_per_process(server.port, server.worker_pids)
        cpu = CpuWindow(server.worker_pids, server.postgres_cpu())
        waits = server.postgres_waits()
        client0 = cpu_seconds([os.getpid()])[os.getpid()]
        if args.profile:
            profiles.extend(start_profiles(server.worker_pids, args.duration, profile_dir))

        def finish() -> None:
            client = cpu_seconds([os.getpid()])[os.getpid()] - client0
            shares.update(cpu.shares(client))
            if waits is not None:
                run.waits = waits.stop()

        return finish

    loop_factory = _loop_factory()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        rec = runner.run(
            asyncio_load(
                server,
                templates,
                run.variant,
                run.connections,
                args.warmup,
                args.duration,
                args.client,
                args.balance,
                window,
            )
        )
    for process in profiles:
        process.wait()
    if profiles:
        run.profile = profile_summary(sorted(profile_dir.glob("worker-*.txt")))
    run.seconds, run.ops, run.cpu, run.samples = args.duration, rec.figures(), shares, rec.samples


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


# -- the wrk loader -----------------------------------------------------------------------------
def _lua_string(text: str) -> str:
    level = 1
    while f"]{'=' * level}]" in text:
        level += 1
    return f"[{'=' * level}[{text}]{'=' * level}]"


def write_lua_templates(templates: Templates, path: Path, authorization: str) -> None:
    """The templates, the search prefix and the Authorization header, as a Lua table that
    crud_mix.lua reads in init()."""

    def table(items: dict[str, str]) -> str:
        return "{\n" + "".join(f"  {k} = {_lua_string(v)},\n" for k, v in items.items()) + "}"

    order = ", ".join(f'"{rtype}"' for rtype in ORDER)
    prefix = quote(f"{RUN_SYSTEM}|", safe="")
    path.write_text(
        f'return {{\norder = {{{order}}},\nsearch_prefix = "identifier={prefix}",\n'
        f"authorization = {_lua_string(authorization)},\n"
        f"create = {table(templates.create)},\nupdate = {table(templates.update)},\n}}\n"
    )


_WRK_LINE = re.compile(r"^CRUDMIX (\w+) (.*)$")


def _wrk(
    server: Server, run: Run, seconds: float, lua_templates: Path, balance: bool
) -> tuple[str, float, list[int]]:
    """Run wrk once (restarted until its connections are spread evenly over the workers, when
    `balance`); its output, the CPU seconds it used and the connections per worker."""
    command = [
        "wrk",
        "-t",
        str(run.connections),
        "-c",
        str(run.connections),
        "-d",
        f"{max(int(seconds), 1)}s",
        "--timeout",
        "30s",
        "-s",
        str(LUA_SCRIPT),
        server.base,
        "--",
        str(lua_templates),
        run.variant,
    ]
    fair = _fair_share(run.connections, len(server.worker_pids))
    for _ in range(20):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        # A fresh run id per start: a restarted wrk must not reuse the identifiers it searches by.
        wrk = subprocess.Popen(
            [*command, uuid.uuid4().hex[:8]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.5)
        spread = connections_per_process(server.port, server.worker_pids)
        if not balance or max(spread) <= fair or wrk.poll() is not None:
            break
        wrk.terminate()
        wrk.communicate()
    output, errors = wrk.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if wrk.returncode != 0:
        raise RuntimeError(f"wrk failed: {errors.strip() or output.strip()}")
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return output, used, spread


def run_wrk(server: Server, templates: Templates, run: Run, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="crud-mix-") as tmp:
        lua_templates = Path(tmp) / "templates.lua"
        write_lua_templates(templates, lua_templates, server.authorization)
        if args.warmup:
            _wrk(server, run, args.warmup, lua_templates, balance=False)
        cpu = CpuWindow(server.worker_pids, server.postgres_cpu())
        waits = server.postgres_waits()
        output, client_seconds, run.spread = _wrk(
            server, run, args.duration, lua_templates, args.balance
        )
        run.cpu = cpu.shares(client_seconds)
        if waits is not None:
            run.waits = waits.stop()
    for line in output.splitlines():
        match = _WRK_LINE.match(line)
        if match is None:
            continue
        kind, rest = match.groups()
        if kind == "error":
            run.samples.append(rest)
            continue
        values = dict(item.split("=", 1) for item in rest.split())
        if kind == "summary":
            run.seconds = int(values["duration_us"]) / 1e6
            if values["socket_errors"] != "0":
                run.samples.append(f"wrk socket errors: {values['socket_errors']}")
        else:
            run.ops[kind] = Figures(
                int(values["n"]),
                int(values["errors"]),
                *(float(values[k]) for k in ("p50", "p95", "p99", "max")),
            )
    if "all" not in run.ops:
        raise RuntimeError(f"wrk gave no CRUDMIX figures:\n{output}")


# -- the benchmark ------------------------------------------------------------------------------
def measure(
    server: Server, templates: Templates, run: Run, args: argparse.Namespace
) -> Run:  # one line of the summary
    run.busy_before = wait_for_quiet(args.quiet_busy, args.quiet_wait)
    sessions = server.sessions()
    with RssSampler(server.worker_pids) as rss:
        (run_wrk if run.loader == "wrk" else run_asyncio)(server, templates, run, args)
    run.sessions = server.sessions() - sessions
    run.rss = (rss.start, rss.peak, rss.end)
    run.supervisor_rss = server.supervisor_rss()
    run.data = server.data_size()
    print_run(run)
    return run


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def print_run(run: Run) -> None:
    print(
        f"## {run.database}, {run.workers} worker(s), {run.loader}, variant {run.variant} "
        f"({VARIANTS[run.variant]}), {run.connections} connections, as {run.caller}, "
        f"{run.seconds:.0f} s"
    )
    print(
        f"machine busy before the run: {run.busy_before:.0%}; load average "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    print("| operation | requests | req/s | p50 ms | p95 ms | p99 ms | max ms | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for op, f in run.ops.items():
        rate = f.count / run.seconds if run.seconds else 0
        print(
            f"| {op} | {f.count} | {rate:.0f} | {f.p50:.1f} | {f.p95:.1f} | {f.p99:.1f} "
            f"| {f.max:.1f} | {f.errors} |"
        )
    print(
        "CPU (share of the machine): "
        + ", ".join(f"{name} {share:.0%}" for name, share in run.cpu.items())
    )
    print(
        "CPU per request: "
        + ", ".join(f"{user} {run.cpu_ms(user):.2f} ms" for user in CPU_USERS[:3])
    )
    if run.database == "postgresql":
        print(f"PostgreSQL connections opened during the run (warm-up included): {run.sessions}")
        waiting = ", ".join(f"{what} {n:.2f}" for what, n in list(run.waits.items())[:5])
        print(f"active PostgreSQL connections on average, by wait: {waiting or 'none'}")
    print(f"client connections per worker: {', '.join(map(str, run.spread))}")
    supervisor = f" (+ supervisor {_mib(run.supervisor_rss)} MiB)" if run.supervisor_rss else ""
    print(
        f"server RSS, sum over workers: start {_mib(run.rss[0])} MiB, peak {_mib(run.rss[1])} "
        f"MiB, end {_mib(run.rss[2])} MiB{supervisor}"
    )
    print(
        f"data after the run: {run.data['live']} live resources, {run.data['deleted']} deleted, "
        f"{run.data['history']} history rows"
    )
    for sample in run.samples:
        print(f"error: {sample}")
    if run.profile:
        print(f"py-spy profile of the workers:\n{run.profile}")
    print(flush=True)


def _verdict(run: Run) -> str:
    if run.database != "postgresql":
        return "n/a (PostgreSQL target)"
    return "met" if run.met else "not met"


def print_summary(runs: list[Run]) -> None:
    print("# Summary")
    print(
        "| database | workers | as | loader | variant | conns | req/s | p50 ms | p95 ms | p99 ms "
        "| errors | CPU % client/server/PG/other | CPU ms per request server/PG "
        "| RSS MiB start/peak/end | target |"
    )
    print("|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---|---|")
    for r in runs:
        a = r.ops["all"]
        shares = "/".join(f"{r.cpu.get(k, 0) * 100:.0f}" for k in CPU_USERS)
        per_request = f"{r.cpu_ms('server'):.2f}/{r.cpu_ms('postgres'):.2f}"
        print(
            f"| {r.database} | {r.workers} | {r.caller} | {r.loader} | {r.variant} "
            f"| {r.connections} "
            f"| {r.rps:.0f} | {a.p50:.1f} | {a.p95:.1f} | {a.p99:.1f} | {a.errors} | {shares} "
            f"| {per_request} | {_mib(r.rss[0])}/{_mib(r.rss[1])}/{_mib(r.rss[2])} "
            f"| {_verdict(r)} |"
        )
    print()
    for variant in sorted({r.variant for r in runs}):
        postgres = [r for r in runs if r.database == "postgresql" and r.variant == variant]
        if not postgres:
            continue
        best = max(postgres, key=lambda r: (r.met, r.rps))
        verdict = "met" if best.met else "not met"
        print(
            f"target ≥ {TARGET_RPS:,} requests/s with p99 ≤ {TARGET_P99_MS:.0f} ms on PostgreSQL, "
            f"variant {variant} ({VARIANTS[variant]}): {verdict} — best {best.rps:.0f} req/s, "
            f"p99 {best.ops['all'].p99:.1f} ms ({best.workers} worker(s), {best.loader}, "
            f"{best.connections} connections)"
        )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _names(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [x for x in text.split(",") if x]
        unknown = set(names) - set(allowed)
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown: {', '.join(sorted(unknown))}")
        return names

    return parse


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--databases", type=_names(("postgresql", "sqlite")), default="postgresql,sqlite"
    )
    parser.add_argument("--pg-workers", type=_ints, default="1,2", help="worker counts to run")
    parser.add_argument("--sqlite-workers", type=_ints, default="1")
    parser.add_argument("--variants", type=_names(tuple(VARIANTS)), default="delete,search")
    parser.add_argument("--loaders", type=_names(("asyncio", "wrk")), default="asyncio,wrk")
    parser.add_argument("--connections", type=_ints, default="16", help="e.g. 8,16,32")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before each run")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of each run")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw")
    parser.add_argument(
        "--as",
        dest="caller",
        choices=tuple(CALLERS),
        default="hospital",
        help="hospital: a system client of one organization, whose access rules filter; "
        "platform: the platform's client without organization, which sees everything; "
        "unsecured: the same server with its security taken out (benchmarks/unsecured.py), "
        "the baseline of what the security costs",
    )
    parser.add_argument(
        "--no-balance",
        dest="balance",
        action="store_false",
        help="keep the kernel's uneven spread of connections over the workers",
    )
    parser.add_argument("--profile", default="", help="directory: py-spy the asyncio runs")
    parser.add_argument("--pg-admin", default=PG_ADMIN, help="PostgreSQL URL to create DBs")
    parser.add_argument(
        "--quiet-busy", type=float, default=0.25, help="wait while others use more of the CPU"
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=10.0, help="longest wait before a run, seconds"
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    loaders = list(args.loaders)
    if "wrk" in loaders and shutil.which("wrk") is None:
        print("wrk not found: install it with `apt-get install -y wrk`; wrk runs skipped\n")
        loaders.remove("wrk")
    print_header("CRUD mix over HTTP (HealthSamurai crud.js scenario)", args.pg_admin)
    for name, meaning in VARIANTS.items():
        print(f"variant {name}: {meaning}")
    print(f"warm-up {args.warmup:.0f} s, timed {args.duration:.0f} s per run; client {args.client}")
    spread = "spread evenly over the workers" if args.balance else "as the kernel hands them out"
    print(f"client connections: {spread}")
    print(
        "server: cityhealth serve, CITYHEALTH_LOG_LEVEL=warning (no per-request log line), "
        f"CITYHEALTH_ACCESS_TOKEN_MINUTES={ACCESS_TOKEN_MINUTES} (one token for the whole run)"
    )
    organization = CALLERS[args.caller]
    if args.caller == "unsecured":
        print(
            "server: benchmarks/unsecured.py — the same application with its security taken "
            "out: no token checked, no access rule, no AuditEvent (the baseline)"
        )
    print(
        f"requests as {args.caller}: a system client ({SYSTEM_SCOPE}) "
        + (
            f"of {organization}, signed in with client credentials; the access rules show it "
            "what its organization holds and the patients it treats"
            if organization
            else "without organization, signed in with client credentials; it sees everything"
        )
        + "\n"
    )
    templates = load_templates()
    configs = [("postgresql", w) for w in args.pg_workers if "postgresql" in args.databases]
    configs += [("sqlite", w) for w in args.sqlite_workers if "sqlite" in args.databases]
    runs = []
    for database, workers in configs:
        server = Server(database, workers, args.pg_admin)
        if args.caller == "unsecured":
            server.command = (sys.executable, str(HERE / "unsecured.py"))
        with server:
            server.sign_in(f"bench-{args.caller}-{uuid.uuid4().hex[:8]}", organization)
            for variant in args.variants:
                for loader in loaders:
                    for connections in args.connections:
                        run = Run(database, workers, loader, variant, connections, args.caller)
                        runs.append(measure(server, templates, run, args))
    print_summary(runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
