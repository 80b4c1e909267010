"""bench.timeline cuts each round trip at its own marks, and leaves out one it cannot cut."""

from __future__ import annotations

from bench.timeline import _FRAME, _READ, _REQUEST, _SEND, STAGES, stages


def _caller_and_owner(trips: list[int]) -> tuple[dict, dict]:
    """Marks of round trips starting at each time in ``trips`` (ns), 1,000 ns per stage."""
    caller: dict = {k: [] for k in (_REQUEST, _SEND, _READ, _FRAME)}
    owner: dict = {_READ: [], _SEND: []}
    for t in trips:
        caller[_SEND].append((t + 1000, t + 2000, 150))
        owner[_READ].append((t + 3000, t + 6500, 0))
        owner[_SEND].append((t + 4000, t + 5000, 120))
        caller[_READ].append((t + 6000, t + 9000, 0))
        caller[_FRAME].append((t + 7000, t + 8000, 0x43))
        caller[_REQUEST].append((t, t + 10000, 0))
    return caller, owner


def test_each_round_trip_is_cut_at_its_own_marks_and_warm_up_is_skipped() -> None:
    caller, owner = _caller_and_owner([0, 50_000, 100_000])
    # a heartbeat the owner read and answered between two round trips: part of neither
    owner[_READ].insert(1, (20_000, 21_000, 0))
    owner[_SEND].insert(1, (20_500, 20_900, 40))
    rows = stages(caller, owner, skip=1)
    assert rows == [[1000] * len(STAGES)] * 2


def test_a_round_trip_whose_marks_do_not_nest_is_left_out() -> None:
    caller, owner = _caller_and_owner([0, 50_000, 100_000])
    # the first answer's read ends after its request returned
    caller[_READ][0] = (6000, 11_000, 0)
    # in the second, the owner read a frame with no answer before the command's
    owner[_READ].insert(1, (52_100, 52_700, 0))
    rows = stages(caller, owner, skip=0)
    assert rows == [[1000] * len(STAGES)]
