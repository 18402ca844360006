"""The audit trail: AuditEvent resources, chained by hashes so that no change goes unnoticed.

Each AuditEvent is stored through the repository, in the transaction of the action it records,
with a row in `audit_pending`. `settle` then takes the queued events in order, many at a time
(a background `Settler` every half second, and any reader of the trail first): it writes their
index rows (residents and auditors search them like any resource) and gives each
the next row of `audit_chain`: its sequence number, the SHA-256 of its exact stored text, the
previous row's hash and its own hash over all of these. An action so pays for one small row
of its record, not for a dozen index rows and a turn of the chain's lock — the lock would
make every write of the city wait in one queue. `verify` walks the chain and names every
place where an event was altered, removed, reordered or slipped in beside the chain; events
still queued (for well under a second) are checked from the next pass on.

A chain alone cannot show that its newest rows were cut off; the head's hash is logged at
every append so that an outside copy of the log anchors it.

At the end of their retention the oldest events may be removed (`prune`), from the start of
the chain only: an access record after `access_days`, any other after `processing_days`; the
first event still kept stops the pruning. The last removed row's hash stays in `audit_anchor`,
where the chain now starts.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, delete, func, insert, select

from cityhealth.db import Database
from cityhealth.fhir import jsonio, store
from cityhealth.fhir.schema import resource
from cityhealth.fhir.store import IndexEntry, Stored
from cityhealth.security.schema import audit_anchor, audit_chain, audit_pending

if TYPE_CHECKING:
    from cityhealth.fhir.repository import Repository

log = logging.getLogger("cityhealth.audit")

GENESIS = "0" * 64
_LOCK = 7_220_419  # PostgreSQL advisory lock key: one appender at a time
_BATCH = 1000
_US_PER_DAY = 86_400_000_000
_CHAIN_COLUMNS = ("seq", "event_id", "recorded_at", "body_digest", "prev_hash", "hash")


@dataclass(frozen=True)
class Problem:
    seq: int | None  # where in the chain; None for an event outside it
    event: str  # AuditEvent/<id>
    what: str


def digest(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


def link(prev_hash: str, seq: int, event: str, recorded_at: int, body_digest: str) -> str:
    """The hash of one chain row."""
    material = f"{prev_hash}|{seq}|{event}|{recorded_at}|{body_digest}"
    return hashlib.sha256(material.encode()).hexdigest()


def record(repository: Repository, conn: Connection, event: dict[str, Any]) -> Stored:
    """Store an AuditEvent inside the caller's transaction: the action and its record commit or
    fail together (the repository queues every AuditEvent it writes for `settle`)."""
    (stored,) = repository.add_records(conn, [event])
    return stored


def insert_queued(conn: Connection, rows: list[dict[str, Any]]) -> list[int]:
    """Insert the current rows of new AuditEvents (as store.insert_new) and queue them for
    `settle`, in the transaction of the action they record; their rids, in order. On
    PostgreSQL one statement for all."""
    if not rows:
        return []
    if conn.dialect.name != "postgresql":
        rids = store.insert_new(conn, rows)
        store.bulk(
            conn,
            audit_pending,
            ("shard", "rid"),
            [(r["shard"], rid) for r, rid in zip(rows, rids, strict=True)],
        )
        return rids
    values = [
        (r["shard"], r["type"], r["id"], r["version"], r["last_updated"], r["body"]) for r in rows
    ]
    params = (jsonio.dumps(values).decode(),)
    found = {row.id: int(row.rid) for row in store.run(conn, _INSERT_QUEUED, params)}
    return [found[r["id"]] for r in rows]


_INSERT_QUEUED = (
    "WITH r AS (INSERT INTO resource (shard, type, id, version, last_updated, body, deleted)"
    " SELECT (e->>0)::bigint, e->>1, e->>2, (e->>3)::int, (e->>4)::bigint, e->>5, false"
    " FROM json_array_elements(?::json) WITH ORDINALITY AS x(e, n) ORDER BY n"
    " RETURNING rid, shard, id),"
    " q AS (INSERT INTO audit_pending (shard, rid) SELECT shard, rid FROM r ORDER BY rid)"
    " SELECT id, rid FROM r"
)


def settle(repository: Repository, wait: bool = True) -> int:
    """Index and chain the AuditEvents queued since the last pass, in the order they were
    queued; how many. One pass at a time: with `wait` False, none if another
    is at work."""
    settled = 0
    while True:
        with repository.db.write() as conn:
            if not _lock(conn, wait):
                return settled
            rows = store.run(conn, _QUEUED, (_BATCH,)).all()
            if not rows:
                return settled
            events = [store.stored_row(row[1:], "POST") for row in rows if row.rid is not None]
            entries = []
            for event in events:
                indexed = repository.index(jsonio.loads(event.body or "{}"), event.type, event.id)
                entries.append(
                    IndexEntry(event.rid, event.shard, event.type, indexed.rows, indexed.patients)
                )
            store.write_index(conn, entries)
            append(conn, events)
            done = audit_pending.c.seq.in_([row.seq for row in rows])
            conn.execute(delete(audit_pending).where(done))
        settled += len(events)
        if len(rows) < _BATCH:
            return settled


class Settler:
    """Settles the queued AuditEvents in the background, every `seconds`: a reader of the trail
    finds it settled (or settles the rest first), and a change to a record not yet chained can
    go unnoticed only that long."""

    def __init__(self, repository: Repository, seconds: float = 0.5) -> None:
        self.repository = repository
        self.seconds = seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="audit-settle", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread after a last pass (what is left waits for the next start)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(30)
            self._settle(wait=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.seconds):
            self._settle(wait=False)

    def _settle(self, wait: bool) -> None:
        try:
            settle(self.repository, wait)
        except Exception:  # the queue is kept: the next pass, or a reader, settles it
            log.exception("settling the audit trail failed")


_QUEUED = (
    "SELECT q.seq, r.rid, r.shard, r.type, r.id, r.version, r.last_updated, r.deleted, r.body"
    " FROM audit_pending q LEFT JOIN resource r ON r.shard = q.shard AND r.rid = q.rid"
    " ORDER BY q.seq LIMIT ?"
)


def _lock(conn: Connection, wait: bool) -> bool:
    """Take the chain's turn for this transaction (SQLite's write lock already serializes)."""
    if conn.dialect.name != "postgresql":
        return True
    if wait:
        store.run(conn, "SELECT pg_advisory_xact_lock(?)", (_LOCK,))
        return True
    return bool(store.run(conn, "SELECT pg_try_advisory_xact_lock(?)", (_LOCK,)).scalar())


def append(conn: Connection, events: list[Stored]) -> None:
    """Chain stored AuditEvents (the caller holds the chain's turn)."""
    if not events:
        return
    head = store.run(conn, "SELECT seq, hash FROM audit_chain ORDER BY seq DESC LIMIT 1").first()
    seq, prev_hash = (head.seq, head.hash) if head else (0, GENESIS)
    rows = []
    for stored in events:
        seq += 1
        event_ref = f"AuditEvent/{stored.id}"
        body_digest = digest(stored.body or "")
        row_hash = link(prev_hash, seq, event_ref, stored.last_updated, body_digest)
        rows.append((seq, event_ref, stored.last_updated, body_digest, prev_hash, row_hash))
        prev_hash = row_hash
    store.bulk(conn, audit_chain, _CHAIN_COLUMNS, rows)
    log.info("audit chain head %s %s", seq, prev_hash)


def verify(db: Database) -> list[Problem]:
    """Every place where the trail differs from what was recorded; empty when it is intact."""
    problems: list[Problem] = []
    chained: set[str] = set()
    with db.read() as conn:
        anchor = conn.execute(
            select(audit_anchor.c.seq, audit_anchor.c.hash)
            .order_by(audit_anchor.c.seq.desc())
            .limit(1)
        ).first()
        expected_seq, prev_hash = (anchor.seq + 1, anchor.hash) if anchor else (1, GENESIS)
        for row in _chain_rows(conn):
            chained.add(row.event_id)
            if row.seq != expected_seq:
                problems.append(
                    Problem(row.seq, row.event_id, f"rows {expected_seq}–{row.seq - 1} are missing")
                )
            if row.prev_hash != prev_hash:
                problems.append(
                    Problem(row.seq, row.event_id, "does not follow the previous row (reordered?)")
                )
            recorded = link(row.prev_hash, row.seq, row.event_id, row.recorded_at, row.body_digest)
            if recorded != row.hash:
                problems.append(Problem(row.seq, row.event_id, "chain row altered"))
            problems.extend(_check_event(conn, row))
            expected_seq, prev_hash = row.seq + 1, row.hash
        for event_id in _stored_events(conn):
            if event_id not in chained:
                problems.append(Problem(None, event_id, "stored outside the audit trail"))
    return problems


#: Subtypes (restful-interaction) of the records of access; all others record processing.
ACCESS_SUBTYPES = frozenset({"read", "vread", "search", "history", "operation"})


def is_access_record(body: str) -> bool:
    event = jsonio.loads(body)
    subtypes = {s.get("code") for s in event.get("subtype") or ()}
    return (event.get("type") or {}).get("code") == "rest" and bool(subtypes & ACCESS_SUBTYPES)


def prune(db: Database, now_us: int, access_days: int, processing_days: int) -> int:
    """Remove the events at the start of the chain whose retention has ended; how many."""
    removed = 0
    with db.write() as conn:
        _lock(conn, wait=True)
        last = None
        for row in _chain_rows(conn):
            found = store.current(conn, "AuditEvent", row.event_id.removeprefix("AuditEvent/"))
            kept_days = (
                access_days
                if found is not None and found.body and is_access_record(found.body)
                else processing_days
            )
            if row.recorded_at >= now_us - kept_days * _US_PER_DAY:
                break
            if found is not None:
                _remove(conn, found)
            conn.execute(delete(audit_chain).where(audit_chain.c.seq == row.seq))
            last, removed = row, removed + 1
        if last is not None:
            conn.execute(
                insert(audit_anchor).values(
                    seq=last.seq, hash=last.hash, pruned_at=now_us, events=removed
                )
            )
            log.info(
                "audit trail pruned through %s (%s events); anchor %s", last.seq, removed, last.hash
            )
    return removed


def _remove(conn: Connection, event: Stored) -> None:
    """An event and every trace of it in the store (its retention has ended)."""
    store.clear_index(conn, event.shard, event.rid)
    conn.execute(
        delete(resource).where(resource.c.shard == event.shard, resource.c.rid == event.rid)
    )


def _chain_rows(conn: Connection) -> Iterator[Any]:
    after = 0
    while True:
        rows = conn.execute(
            select(audit_chain)
            .where(audit_chain.c.seq > after)
            .order_by(audit_chain.c.seq)
            .limit(_BATCH)
        ).all()
        yield from rows
        if len(rows) < _BATCH:
            return
        after = rows[-1].seq


def _check_event(conn: Connection, row: Any) -> list[Problem]:
    current = store.current(conn, "AuditEvent", row.event_id.removeprefix("AuditEvent/"))
    if current is None or current.deleted:
        return [Problem(row.seq, row.event_id, "event removed")]
    if current.version != 1 or digest(current.body or "") != row.body_digest:
        return [Problem(row.seq, row.event_id, "event altered")]
    return []


def queued(db: Database) -> int:
    """How many AuditEvents wait for `settle`: stored, to be chained within a second or so."""
    with db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(audit_pending)).scalar_one())


def _stored_events(conn: Connection) -> Iterator[str]:
    """Every stored AuditEvent but those queued for `settle`."""
    q = audit_pending
    waiting = select(q.c.seq).where(q.c.shard == resource.c.shard, q.c.rid == resource.c.rid)
    query = select(resource.c.id).where(resource.c.type == "AuditEvent", ~waiting.exists())
    for (rid_id,) in conn.execute(query):
        yield f"AuditEvent/{rid_id}"
