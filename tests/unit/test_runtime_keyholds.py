"""Keys held for a previous owner's outputs (runtime/owed.py, ``KeyHolds`` and ``Owed``): the
bound of a hold, what waited behind a held key when its partition drains away, and a previous
owner's mark that comes before the hand-over it is about.

The bound runs only while the held outputs have a receiver to go to.

A new owner holds a key until the outputs its old owner's messages emitted are acknowledged; past
``timeout`` the key runs on, so that flows waiting on each other across nodes cannot wedge. While
a service those outputs go to has no instance at all, nothing can be waiting on such a flow, and
what the key emitted next would wait for the same receiver: running on would only let it go
first once one comes (chaos pipeline seed 109). Timers are run by hand here, in virtual time.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from choreo import core
from choreo.runtime.owed import KeyHolds, Owed
from choreo.runtime.transfer import Delta

TIMEOUT = 16.0


class FakeHost:
    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[tuple[float, Any]] = []
        self.missing: set[str] = set()  # types whose receiving service has no instance now

    def clock(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Any) -> None:
        self.timers.append((self.now + delay, callback))

    def receiver_missing(self, type_name: str) -> bool:
        return type_name in self.missing

    def schedule_flush(self) -> None: ...

    def fire(self) -> float:
        """Run the earliest timer; returns its delay from the time before."""
        self.timers.sort(key=lambda t: t[0])
        at, callback = self.timers.pop(0)
        delay, self.now = at - self.now, at
        callback()
        return delay


def holding(host: FakeHost) -> tuple[KeyHolds, Any]:
    keyed = core.KeyedDispatch()
    holds = KeyHolds(keyed, deque(), lambda: None, host, TIMEOUT, "forward")  # type: ignore[arg-type]
    holds.hold(3, b"k1", b"m" * 16, b"t" * 16, ["Relayed"])
    assert keyed.busy(b"k1")
    return holds, keyed


def test_a_hold_runs_on_after_its_bound_when_its_outputs_have_a_receiver() -> None:
    host = FakeHost()
    holds, keyed = holding(host)
    assert host.fire() == TIMEOUT
    assert not keyed.busy(b"k1") and not holds.traces, "the key runs on"


def test_a_hold_lasts_while_its_outputs_have_no_receiver_and_a_whole_bound_after_one_comes() -> None:
    host = FakeHost()
    host.missing.add("Relayed")
    holds, keyed = holding(host)
    host.fire()
    for _ in range(20):  # far past the bound: still held, looked at again every TIMEOUT / 8
        assert keyed.busy(b"k1") and holds.traces
        assert host.fire() == TIMEOUT / 8
    host.missing.clear()  # a receiver joined: the bound starts again from the next look
    assert host.fire() == TIMEOUT / 8
    assert keyed.busy(b"k1"), "the old owner's outputs may reach the new receiver first"
    assert host.fire() == TIMEOUT
    assert not keyed.busy(b"k1") and not host.timers


def test_a_hold_released_by_its_mark_leaves_no_timer_that_frees_a_later_hold_of_its_key() -> None:
    host = FakeHost()
    holds, keyed = holding(host)
    holds.release(b"k1", b"m" * 16)
    assert not keyed.busy(b"k1")
    host.now = 1.0
    holds.hold(3, b"k1", b"n" * 16, b"t" * 16, ["Relayed"])  # a later hold of the same key
    assert host.fire() == TIMEOUT - 1.0  # the first hold's timer (its receiver is there): not this hold's
    assert keyed.busy(b"k1")
    host.fire()
    assert not keyed.busy(b"k1"), "this hold's own timer frees it"


class Waiting:
    """A message queued behind a held key (a ``Job``, as ``KeyedDispatch`` keeps it)."""

    def __init__(self, n: int, channel: object | None = "a sender") -> None:
        self.n = n
        self.channel = channel
        self.env = type("Env", (), {"key": b"k1"})()
        self.holds_key = False


def test_what_waited_behind_a_held_key_leaves_unrun_when_its_partition_drains_away() -> None:
    # run where the partition drains from, its outputs would leave before the held ones, which
    # the previous owner sends (chaos pipeline seed 196): they go to the next owner instead
    host = FakeHost()
    holds, keyed = holding(host)
    waiting = [Waiting(1), Waiting(2)]
    for job in waiting:
        assert not keyed.admit(b"k1", job)
    assert holds.release_partition(4) == [] and keyed.busy(b"k1"), "another partition: nothing moves"
    assert holds.release_partition(3) == waiting, "taken out, in their order"
    assert not keyed.busy(b"k1") and not holds.ready and not holds.traces


def test_a_replay_behind_a_held_key_runs_here_when_its_partition_drains_away() -> None:
    host = FakeHost()
    holds, keyed = holding(host)
    replay = Waiting(1, channel=None)  # a dead letter's replay: nobody to pass it on for
    assert not keyed.admit(b"k1", replay)
    assert holds.release_partition(3) == []
    assert list(holds.ready) == [replay] and replay.holds_key and keyed.busy(b"k1")


def test_a_mark_that_comes_before_its_hand_over_is_not_lost() -> None:
    # the hand-over waited for this node's view to give it the partition while the previous owner
    # saw the message's outputs acknowledged and said so: dropped, the mark left the key held and
    # the outputs owed until the previous owner went, then sent again (chaos pipeline seed 231)
    host = FakeHost()
    keyed = core.KeyedDispatch()
    holds = KeyHolds(keyed, deque(), lambda: None, host, TIMEOUT, "forward")  # type: ignore[arg-type]
    owed = Owed(host, {}, None, "forward")  # type: ignore[arg-type]
    owed.holds = holds
    early, late = b"e" * 16, b"l" * 16
    assert not owed.marked(early), "nothing owed for it yet"
    for msg_id in (early, late):
        owed.add(Delta(3, b"k" + msg_id[:1], [], "Reading", msg_id, 0.0, None, False, [("Relayed", b"")], b"t" * 16),
                 by=7, ours=True)
    assert early not in owed.by and not keyed.busy(b"ke"), "marked done already: neither owed nor held"
    assert late in owed.by and keyed.busy(b"kl"), "the other waits for its mark as before"
    assert owed.marked(late) and not keyed.busy(b"kl") and not owed.early_marks
