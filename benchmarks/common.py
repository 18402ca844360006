"""What every benchmark needs: a description of the machine, a `cityhealth serve` on a fresh
database, an access token for it, and the memory and CPU figures of processes, read from /proc.

Server, database and load generator share one machine, so figures are only comparable when
the benchmark also says how busy the machine was and who used the CPU.
"""

from __future__ import annotations

import base64
import contextlib
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO
from urllib.parse import quote_plus
from zoneinfo import ZoneInfo

import orjson
import psycopg

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_SHANGHAI = ZoneInfo("Asia/Shanghai")


# -- the machine ------------------------------------------------------------------------------
def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024**2
    return 0.0


def postgres_version(admin_url: str = PG_ADMIN) -> str:
    try:
        with psycopg.connect(admin_url, connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            settings = conn.execute(
                "SELECT string_agg(name || '=' || current_setting(name), ' ' ORDER BY name) "
                "FROM pg_settings WHERE name IN "
                "('shared_buffers', 'autovacuum', 'synchronous_commit', 'max_connections')"
            ).fetchone()
    except psycopg.OperationalError as error:
        return f"unreachable ({str(error).splitlines()[0]})"
    assert row is not None and settings is not None
    return f"{row[0]} ({settings[0]})"


def machine_info(admin_url: str = PG_ADMIN) -> dict[str, str]:
    now = datetime.now(UTC)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "date": f"{now:%Y-%m-%d %H:%M} UTC ({now.astimezone(_SHANGHAI):%Y-%m-%d %H:%M} Shanghai)",
        "cpu": f"{_cpu_model()}, {os.cpu_count()} cores",
        "ram": f"{_ram_gib():.1f} GiB",
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "postgresql": postgres_version(admin_url),
        "sqlite": sqlite3.sqlite_version,
        "load average": load,
    }


def print_header(title: str, admin_url: str = PG_ADMIN) -> dict[str, str]:
    """Print the title, the exact command and the machine; return the machine description."""
    info = machine_info(admin_url)
    print(f"# {title}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    for key, value in info.items():
        print(f"{key}: {value}")
    print()
    return info


# -- CPU and memory of processes -------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces and parentheses: the fields start after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def _cpu_of(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU time of each process still alive."""
    times = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            times[pid] = _cpu_of(fields)
    return times


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two snapshots; a process born in between counts from zero."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    return total


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, summed over cores."""
    values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user time
    return (total - idle) / _TICK, total / _TICK


def machine_busy(seconds: float = 2.0) -> float:
    """Share of the machine's CPU (0..1) busy over the next `seconds`."""
    busy0, total0 = machine_cpu()
    time.sleep(seconds)
    busy1, total1 = machine_cpu()
    return (busy1 - busy0) / max(total1 - total0, 1e-9)


def wait_for_quiet(max_busy: float, max_wait: float) -> float:
    """Wait (at most `max_wait` s) until others leave the CPU mostly idle; the last measure."""
    deadline = time.monotonic() + max_wait
    busy = machine_busy()
    while busy > max_busy and time.monotonic() < deadline:
        busy = machine_busy()
    return busy


def _uptime_ticks() -> float:
    return float(Path("/proc/uptime").read_text().split()[0]) * _TICK


class PostgresCpu:
    """CPU time PostgreSQL spends for one database, sampled in a background thread: its
    backends and the shared background processes (WAL writer, checkpointer …).

    Backends of connections closed during the window are gone from /proc; the postmaster's
    reaped-children time holds them. From it, the lifetime time of the other databases'
    backends that exited (seen while alive) is taken away, so that another client's closed
    connection is not counted as ours."""

    def __init__(self, postmaster: int, database: str, interval: float = 0.1) -> None:
        self.postmaster = postmaster
        self.database = database
        self.interval = interval
        self.mine: dict[int, bool] = {}
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._since = _uptime_ticks()
        self._reaped = self._reaped_seconds()
        self._sample()
        self._thread.start()

    def _reaped_seconds(self) -> float:
        fields = _stat_fields(self.postmaster)
        return (int(fields[13]) + int(fields[14])) / _TICK if fields else 0.0

    def _sample(self) -> None:
        path = Path(f"/proc/{self.postmaster}/task/{self.postmaster}/children")
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for pid in map(int, path.read_text().split()):
                fields = _stat_fields(pid)
                if fields is None:
                    continue
                cpu = _cpu_of(fields)
                if pid not in self.mine:
                    title = f" {_cmdline(pid).strip()} "
                    client = "(" in title or "[local]" in title
                    self.mine[pid] = f" {self.database} " in title or not client
                    self.first[pid] = 0.0 if int(fields[19]) >= self._since else cpu
                self.last[pid] = cpu

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> float:
        """Stop sampling; the CPU seconds spent for the database since the start."""
        self._stop.set()
        self._thread.join()
        self._sample()
        alive = set(cpu_seconds(list(self.last)))
        ours = sum(self.last[p] - self.first[p] for p in self.last if self.mine[p])
        gone_others = sum(self.last[p] for p in self.last if p not in alive and not self.mine[p])
        gone_ours = sum(self.last[p] for p in self.last if p not in alive and self.mine[p])
        # Reaped time not explained by what we saw: our short-lived backends and the
        # unseen tails of our closed connections.
        unseen = self._reaped_seconds() - self._reaped - gone_others - gone_ours
        return ours + max(unseen, 0.0)


class PostgresWaits:
    """What the connections of one database wait for, sampled every `interval` seconds in a
    background thread from pg_stat_activity: a queue on one lock shows here, while the CPU
    shares only show idle time."""

    def __init__(self, admin_url: str, database: str, interval: float = 0.05) -> None:
        self.admin_url = admin_url
        self.database = database
        self.interval = interval
        self.samples = 0
        self.seen: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sql = (
            "SELECT coalesce(wait_event_type || ':' || wait_event, 'running') "
            "FROM pg_stat_activity WHERE datname = %s AND state = 'active' "
            "AND backend_type = 'client backend'"
        )
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            while not self._stop.wait(self.interval):
                rows = conn.execute(sql, (self.database,)).fetchall()
                self.samples += 1
                self.seen.update(str(row[0]) for row in rows)

    def stop(self) -> dict[str, float]:
        """Active connections on average over the window, by what they waited for ("running":
        no wait), most first."""
        self._stop.set()
        self._thread.join()
        samples = max(self.samples, 1)
        return {what: n / samples for what, n in self.seen.most_common()}


class CpuWindow:
    """Who used the machine's CPU between its creation and `shares()`: each share is a fraction
    of the whole machine (all cores), so client + server + postgres + other + idle = 1."""

    def __init__(self, server: list[int], postgres: PostgresCpu | None) -> None:
        self.server = server
        self.postgres = postgres
        self.machine = machine_cpu()
        self.server_cpu = cpu_seconds(server)

    def shares(self, client_seconds: float) -> dict[str, float]:
        pg = self.postgres.stop() if self.postgres else 0.0
        busy1, total1 = machine_cpu()
        total = max(total1 - self.machine[1], 1e-9)
        busy = busy1 - self.machine[0]
        server = cpu_delta(self.server_cpu, cpu_seconds(self.server))
        return {
            "client": client_seconds / total,
            "server": server / total,
            "postgres": pg / total,
            "other": max(busy - client_seconds - server - pg, 0.0) / total,
            "idle": max(1 - busy / total, 0.0),
        }


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def connection_owners(port: int, pids: list[int]) -> dict[int, int]:
    """Established TCP connections to local `port` (IPv4): client port → the process among
    `pids` that holds the server end."""
    inode_owner = {}
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inode_owner[target[8:-1]] = pid
    owners = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
        established = state == "01"
        if established and int(local.split(":")[1], 16) == port and inode in inode_owner:
            owners[int(remote.split(":")[1], 16)] = inode_owner[inode]
    return owners


def connections_per_process(port: int, pids: list[int]) -> list[int]:
    """How many client connections each process serves, in the order of `pids`. uvicorn's
    workers share one listening socket and the kernel does not spread connections evenly."""
    counts = Counter(connection_owners(port, pids).values())
    return [counts.get(pid, 0) for pid in pids]


class RssSampler:
    """Samples the summed RSS of some processes in a background thread: start, peak, end."""

    def __init__(self, pids: list[int], interval: float = 0.2) -> None:
        self.pids = pids
        self.interval = interval
        self.start = self.peak = self.end = rss_bytes(pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes(self.pids))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.end = rss_bytes(self.pids)
        self.peak = max(self.peak, self.end)


# -- profiles -----------------------------------------------------------------------------------
def py_spy() -> str | None:
    """The py-spy executable (next to this Python, or on PATH), if installed."""
    beside = Path(sys.executable).with_name("py-spy")
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


def start_profiles(pids: list[int], seconds: float, out_dir: Path) -> list[subprocess.Popen[bytes]]:
    """Sample each process with py-spy (collapsed stacks): only the thread holding the GIL, so
    that the profile shows where Python spends CPU rather than where threads wait."""
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy not found: install it with `.venv/bin/pip install py-spy`")
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(max(int(seconds), 1)),
                "--rate",
                "100",
                "--gil",
                "--format",
                "raw",
                "--output",
                str(out_dir / f"worker-{pid}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid in pids
    ]


def _frame_name(frame: str) -> str:
    """'fn (path/to/module.py:12)' → 'fn (module.py)': one name per function, any line."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rstrip(")")
    return f"{name} ({Path(file).name})" if file else name


def profile_summary(files: list[Path], top: int = 25) -> str:
    """Self and inclusive shares of the sampled time, per function, over py-spy raw files."""
    self_samples: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for path in files:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [_frame_name(f) for f in stack.split(";")]
            total += count
            self_samples[frames[-1]] += count
            for name in set(frames):
                inclusive[name] += count
    if not total:
        return "no samples"
    lines = [f"{total} samples", "self time:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in self_samples.most_common(top)]
    lines.append("inclusive time:")
    lines += [f"  {n / total:6.1%}  {name}" for name, n in inclusive.most_common(top * 2)]
    return "\n".join(lines)


# -- signing in --------------------------------------------------------------------------------
#: Lifetime of the access tokens a bench server issues (CITYHEALTH_ACCESS_TOKEN_MINUTES): one
#: token serves a whole benchmark, whose runs last up to an hour; the default 5 minutes would
#: end in the middle of one.
ACCESS_TOKEN_MINUTES = 240
#: What a hospital information system is registered with: it acts on its own for every type.
SYSTEM_SCOPE = "system/*.*"
_SECRET = re.compile(r"^client_secret: (\S+)$", re.MULTILINE)


def client_create_command(client_id: str, organization: str | None) -> list[str]:
    """The CLI command registering a system client; with an organization, the hospital whose
    records it holds and sees (a platform client without one sees everything)."""
    command = [
        sys.executable,
        "-m",
        "cityhealth",
        "users",
        "client-create",
        client_id,
        "--name",
        f"Benchmark {client_id}",
        "--role",
        "system",
        "--scope",
        SYSTEM_SCOPE,
    ]
    if organization is not None:
        command += ["--organization", organization]
    return command


def client_secret(cli_output: str) -> str:
    """The secret `users client-create` prints once."""
    found = _SECRET.search(cli_output)
    if found is None:
        raise RuntimeError(f"client-create printed no client_secret:\n{cli_output}")
    return found.group(1)


def token_request(client_id: str, secret: str) -> tuple[dict[str, str], bytes]:
    """Headers and form body of a client-credentials request to /oauth/token, the client
    authenticated with HTTP Basic (its id and secret form-encoded first, RFC 6749 §2.3.1)."""
    pair = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    headers = {
        "Authorization": f"Basic {base64.b64encode(pair).decode('ascii')}",
        "Content-Type": "application/x-www-form-urlencoded",
        "Accept": "application/json",
    }
    return headers, f"grant_type=client_credentials&scope={quote_plus(SYSTEM_SCOPE)}".encode()


def read_token(body: bytes) -> str:
    """The bearer access token of a token endpoint answer."""
    answer = orjson.loads(body)
    if answer.get("token_type", "").lower() != "bearer" or not answer.get("access_token"):
        raise RuntimeError(f"the token endpoint answered no bearer token: {body[:300]!r}")
    token: str = answer["access_token"]
    return token


# -- a server on a fresh database -------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    """`cityhealth serve` on a database made for it (PostgreSQL: created, then dropped;
    SQLite: a file in a temporary directory), with its worker processes known. `sign_in`
    registers a system client and takes an access token for the requests of a benchmark."""

    backend: str  # "postgresql" or "sqlite"
    workers: int
    admin_url: str = PG_ADMIN
    log_level: str = "warning"
    command: tuple[str, ...] = (sys.executable, "-m", "cityhealth", "serve")
    port: int = field(default_factory=free_port)
    database: str = ""
    url: str = ""
    process: subprocess.Popen[bytes] | None = None
    worker_pids: list[int] = field(default_factory=list)
    token: str = ""
    _tmp: tempfile.TemporaryDirectory[str] | None = None
    _log: IO[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self._tmp = tempfile.TemporaryDirectory(prefix="cityhealth-bench-")
        if self.backend == "postgresql":
            self.database = f"cityhealth_bench_{uuid.uuid4().hex[:10]}"
            with psycopg.connect(self.admin_url, autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{self.database}"')
            self.url = (
                self.admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
                + f"/{self.database}"
            )
        else:
            self.database = str(Path(self._tmp.name) / "cityhealth.db")
            self.url = f"sqlite:///{self.database}"
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    @property
    def authorization(self) -> str:
        """The value of the Authorization header of every request (after `sign_in`)."""
        if not self.token:
            raise RuntimeError("sign in first: the FHIR API answers 401 without a token")
        return f"Bearer {self.token}"

    def sign_in(self, client_id: str, organization: str | None) -> str:
        """Register a system client in the server's database with the CLI, as an operator
        registers a hospital's system, and take an access token for it (client credentials);
        the token is kept for `authorization` and returned."""
        registered = subprocess.run(
            client_create_command(client_id, organization),
            cwd=REPO,
            env={**os.environ, "CITYHEALTH_DATABASE_URL": self.url},
            capture_output=True,
            text=True,
        )
        if registered.returncode != 0:
            raise RuntimeError(f"client-create failed: {registered.stderr or registered.stdout}")
        headers, body = token_request(client_id, client_secret(registered.stdout))
        asked = urllib.request.Request(f"{self.base}/oauth/token", body, headers, method="POST")
        try:
            with urllib.request.urlopen(asked, timeout=30) as answer:
                self.token = read_token(answer.read())
        except urllib.error.HTTPError as refused:
            detail = refused.read()[:300]
            raise RuntimeError(f"/oauth/token answered {refused.code}: {detail!r}") from None
        return self.token

    def _start(self) -> None:
        assert self._tmp is not None
        env = {
            **os.environ,
            "CITYHEALTH_DATABASE_URL": self.url,
            "CITYHEALTH_WORKERS": str(self.workers),
            "CITYHEALTH_PORT": str(self.port),
            "CITYHEALTH_LOG_LEVEL": self.log_level,
            "CITYHEALTH_ACCESS_TOKEN_MINUTES": str(ACCESS_TOKEN_MINUTES),
        }
        self._log = open(Path(self._tmp.name) / "server.log", "wb")  # noqa: SIM115
        # Run from the repository so that the compiled definitions cache under ./var is reused.
        self.process = subprocess.Popen(
            list(self.command),
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited at start-up:\n{self.log_tail()}")
            healthz = f"{self.base}/healthz"
            with contextlib.suppress(OSError), urllib.request.urlopen(healthz, timeout=2) as answer:
                if answer.status == 200:
                    break
            time.sleep(0.25)
        else:
            raise RuntimeError(f"the server did not answer /healthz in time:\n{self.log_tail()}")
        self.worker_pids = self._find_workers()

    def _find_workers(self) -> list[int]:
        assert self.process is not None
        if self.workers == 1:
            return [self.process.pid]
        deadline = time.monotonic() + 60
        while True:
            # uvicorn spawns its workers through multiprocessing; the supervisor only watches.
            spawned = [p for p in children(self.process.pid) if "spawn_main" in _cmdline(p)]
            if len(spawned) >= self.workers or time.monotonic() > deadline:
                return spawned
            time.sleep(0.25)

    def log_tail(self, lines: int = 30) -> str:
        assert self._tmp is not None
        path = Path(self._tmp.name) / "server.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def supervisor_rss(self) -> int:
        if self.process is None or self.workers == 1:
            return 0
        return rss_bytes([self.process.pid])

    def postgres_cpu(self) -> PostgresCpu | None:
        """Start measuring the CPU PostgreSQL spends for this server's database."""
        if self.backend != "postgresql":
            return None
        with psycopg.connect(self.admin_url) as conn:  # its process is read while it lives
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None
            fields = _stat_fields(int(row[0]))
        assert fields is not None
        return PostgresCpu(int(fields[1]), self.database)

    def postgres_waits(self) -> PostgresWaits | None:
        """Start sampling what this server's database connections wait for."""
        return (
            PostgresWaits(self.admin_url, self.database) if self.backend == "postgresql" else None
        )

    def sessions(self) -> int:
        """Connections ever opened to this database (0 on SQLite): a pool that keeps its
        connections opens few."""
        if self.backend != "postgresql":
            return 0
        with psycopg.connect(self.admin_url) as conn:
            row = conn.execute(
                "SELECT sessions FROM pg_stat_database WHERE datname = %s", (self.database,)
            ).fetchone()
        return int(row[0]) if row else 0

    def data_size(self) -> dict[str, int]:
        """Current rows (live and deleted) and history rows."""
        sql = (
            "SELECT (SELECT count(*) FROM resource WHERE NOT deleted),"
            " (SELECT count(*) FROM resource WHERE deleted),"
            " (SELECT count(*) FROM resource_history)"
        )
        if self.backend == "postgresql":
            url = self.admin_url.rsplit("/", 1)[0] + f"/{self.database}"
            with psycopg.connect(url) as conn:
                row = conn.execute(sql).fetchone()
        else:
            with contextlib.closing(sqlite3.connect(self.database)) as conn:
                row = conn.execute(sql).fetchone()
        assert row is not None
        return {"live": int(row[0]), "deleted": int(row[1]), "history": int(row[2])}

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.backend == "postgresql" and self.database:
            with psycopg.connect(self.admin_url, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        if self._log is not None:
            self._log.close()
        if self._tmp is not None:
            self._tmp.cleanup()
