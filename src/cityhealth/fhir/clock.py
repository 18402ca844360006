"""Server time for meta.lastUpdated: epoch microseconds, strictly increasing per process."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_lock = threading.Lock()
_last = 0


def now_us() -> int:
    global _last
    with _lock:
        _last = max(time.time_ns() // 1000, _last + 1)
        return _last


def to_datetime(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def instant(us: int) -> str:
    """FHIR instant with microseconds, e.g. 2026-11-25T08:30:00.123456+00:00."""
    return to_datetime(us).isoformat(timespec="microseconds")


def http_date(us: int) -> str:
    return format_datetime(to_datetime(us), usegmt=True)
