"""Database engine: one code path for SQLite (embedded default) and PostgreSQL (psycopg 3)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

_WRITE = "cityhealth_write"
#: Execution option of the engine's fixed statements (`store.run`): prepared on PostgreSQL.
PREPARED = "cityhealth_prepared"


class Database:
    """An engine plus the two kinds of transaction the repository uses."""

    def __init__(self, url: str, pool_size: int = 10) -> None:
        """`pool_size` connections are kept open; callers should not run more threads that
        use the database than that (the app sets its thread limiter to it), so that no request
        pays for opening a connection."""
        self.url = make_url(url)
        self.dialect = self.url.get_backend_name()
        if self.is_sqlite:
            database = self.url.database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(
                self.url, connect_args={"check_same_thread": False, "timeout": 30}
            )
            event.listen(self.engine, "connect", _sqlite_on_connect)
            event.listen(self.engine, "begin", _sqlite_on_begin)
            # Writers of this process queue here, in order, rather than in SQLite's busy
            # handler, which sleeps in growing steps (long tail latencies under load).
            self._write_lock: AbstractContextManager[object] = threading.RLock()
        else:
            # A little overflow for threads outside the request limiter (jobs, start-up). No
            # ping per checkout (a round trip per request): a dropped connection fails one
            # request with 503, and SQLAlchemy then renews the whole pool.
            # Statements with values are prepared only when they ask (PREPARED): the fixed ones
            # of every request, whose plan does not depend on their values, then skip planning
            # (a generic plan after five). A search is sent unprepared, so PostgreSQL plans it
            # for its values every time: one patient's observations and a whole code need
            # different plans, and a generic one was measured 30 times slower at 1 M resources.
            self.engine = create_engine(
                self.url,
                pool_size=pool_size,
                max_overflow=4,
                # psycopg prepares what ran this many times: none but PREPARED (None would
                # disable preparing altogether).
                connect_args={"prepare_threshold": 2**31},
            )
            event.listen(self.engine, "do_execute", _execute_prepared)
            self._write_lock = nullcontext()
        self._write_engine = self.engine.execution_options(**{_WRITE: True})

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction; on SQLite it takes the write lock up front (BEGIN IMMEDIATE)
        so concurrent writers queue instead of failing on lock upgrade."""
        with self._write_lock, self._write_engine.connect() as conn, conn.begin():
            yield conn

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's implicit one is deferred).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    for pragma in (
        "journal_mode=WAL",
        "synchronous=NORMAL",
        "busy_timeout=30000",
        "foreign_keys=ON",
        "cache_size=-65536",
    ):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _execute_prepared(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
    """Execute a PREPARED statement as a prepared one (psycopg); True when it did."""
    if not context.execution_options.get(PREPARED):
        return False
    cursor.execute(statement, parameters, prepare=True)
    return True


def _sqlite_on_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get(_WRITE)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
