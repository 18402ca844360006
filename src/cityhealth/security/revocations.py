"""The access tokens revoked before they expire, as one worker process knows them: read from
the database at most every REFRESH_SECONDS, added to at once when this process revokes one."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

REFRESH_SECONDS = 1.0


class RevokedTokens:
    def __init__(
        self,
        refresh_seconds: float = REFRESH_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._refresh_seconds = refresh_seconds
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._jtis: set[str] = set()
        self._loaded_at: float | None = None

    def fresh(self) -> bool:
        loaded = self._loaded_at
        return loaded is not None and self._monotonic() - loaded < self._refresh_seconds

    def contains(self, jti: str, load: Callable[[], set[str]]) -> bool:
        if not self.fresh():
            with self._lock:
                if not self.fresh():
                    started = self._monotonic()
                    self._jtis = load()  # add() waits for the lock: nothing is lost
                    self._loaded_at = started
        return jti in self._jtis

    def add(self, jti: str) -> None:
        with self._lock:
            self._jtis = self._jtis | {jti}
