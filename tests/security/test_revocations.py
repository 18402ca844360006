"""The revocation list a worker process keeps: a revocation made here counts at once, one made
by another process once the list is read again (at most a second later)."""

from __future__ import annotations

from cityhealth.security.revocations import RevokedTokens


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_list_is_read_again_once_it_is_a_second_old() -> None:
    clock, stored, loads = Clock(), {"a"}, []

    def load() -> set[str]:
        loads.append(clock.now)
        return set(stored)

    revoked = RevokedTokens(1.0, clock)
    assert not revoked.fresh()
    assert revoked.contains("a", load) and not revoked.contains("b", load)
    assert loads == [100.0] and revoked.fresh()
    stored.add("b")  # revoked by another worker process
    clock.now += 0.5
    assert not revoked.contains("b", load)  # not known here yet
    clock.now += 0.6
    assert revoked.contains("b", load) and loads == [100.0, 101.1]


def test_a_revocation_made_here_counts_at_once() -> None:
    clock = Clock()
    revoked = RevokedTokens(1.0, clock)
    assert not revoked.contains("c", set)
    revoked.add("c")
    assert revoked.contains("c", set)
