"""Sliding-window rate limits on login and token requests, kept in the process.

Each worker process counts on its own, so with N workers a key gets up to N times its limit;
the account lockout (counted in the database) bounds password guessing regardless.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from datetime import timedelta

from cityhealth.security.keys import Clock, utc_now


class RateLimiter:
    """At most `limit` admitted requests per key in any `window`."""

    def __init__(
        self,
        clock: Clock = utc_now,
        window: timedelta = timedelta(minutes=1),
        max_keys: int = 100_000,
    ) -> None:
        self.clock = clock
        self.window = window.total_seconds()
        self.max_keys = max_keys
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def admit(self, *limits: tuple[str, int]) -> int:
        """0 and count the request when every (key, limit) allows it; else the seconds to
        wait (for Retry-After), counting nothing, so that refused retries do not extend it."""
        now = self.clock().timestamp()
        with self._lock:
            wait = 0.0
            for key, limit in limits:
                events = self._recent(key, now)
                if len(events) >= limit:
                    wait = max(wait, events[len(events) - limit] + self.window - now)
            if wait > 0:
                return max(1, math.ceil(wait))
            if len(self._events) >= self.max_keys:
                self._forget_idle(now)
            for key, _ in limits:
                self._events.setdefault(key, deque()).append(now)
            return 0

    def _recent(self, key: str, now: float) -> deque[float]:
        events = self._events.get(key, deque())
        while events and events[0] <= now - self.window:
            events.popleft()
        return events

    def _forget_idle(self, now: float) -> None:
        for key in [key for key, events in self._events.items() if not self._recent(key, now)]:
            del self._events[key]
