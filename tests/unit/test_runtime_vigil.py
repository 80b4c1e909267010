"""The node's look at its own life (choreo.runtime.vigil) on its own: frozen, cut off, or fine.

No engine: a real :class:`Membership` whose counts the tests set, a gossip that notes what it is
asked to forgive, and a ``rejoin`` that notes why and makes a new incarnation, as the engine's
``declared_dead`` does.
"""

from __future__ import annotations

from typing import Any

from choreo.config import NodeConfig
from choreo.runtime.membership import Membership, Peer
from choreo.runtime.vigil import Vigil

CONFIG = NodeConfig(suspect_after=1.0, dead_after=3.0, heartbeat=0.25)  # taken for dead after 3.75 s


class Forgiving:
    def __init__(self) -> None:
        self.forgiven: list[float] = []

    def forgive(self, gap: float, now: float) -> None:
        self.forgiven.append(gap)


def vigil(members: int = 3) -> tuple[Vigil, Membership, Forgiving, list[str]]:
    membership, gossip, reasons = Membership(), Forgiving(), []
    membership.live_count = members  # (this node included)
    life = [1]

    def rejoin(reason: str) -> None:
        reasons.append(reason)
        life[0] += 1
        membership.heard_at = None  # (as Membership.clear, when the engine rejoins)

    v = Vigil(CONFIG, membership, gossip, rejoin=rejoin, incarnation=lambda: life[0])  # type: ignore[arg-type]
    return v, membership, gossip, reasons


def test_a_node_frozen_long_enough_to_be_taken_for_dead_rejoins_and_a_shorter_freeze_is_forgiven() -> None:
    v, _, gossip, reasons = vigil()
    v.check(10.0)
    v.check(10.75)  # more than suspect_after / 2: its peers' silence meanwhile was its own
    assert gossip.forgiven == [0.75] and reasons == []
    assert v.awake(11.0) and v.until == 11.5, "a look within half of suspect_after needs no more"
    assert not v.awake(15.0), "3.75 s or more: it rejoined first, and what it held is void"
    assert reasons == ["this node was frozen for 4.0 s, long enough for the mesh to declare it dead"]
    assert v.awake(15.1)


def test_a_node_that_hears_from_none_of_two_members_for_that_long_rejoins() -> None:
    v, membership, _, reasons = vigil(members=3)
    membership.heard_at = 20.0
    for now in (20.5, 21.0, 22.0, 23.0, 23.5):  # ticks: still under 3.75 s of silence
        v.check(now)
    assert reasons == []
    v.check(23.8)
    assert reasons == ["heard from none of its 2 members for 3.8 s, long enough for them to declare it dead"]
    v.check(24.0)
    assert len(reasons) == 1, "once: the new incarnation has heard from nobody yet"


def test_with_one_other_member_a_silence_is_the_others_as_much_as_its_own() -> None:
    v, membership, _, reasons = vigil(members=2)
    membership.heard_at = 0.0
    for now in (0.5, 1.0, 2.0, 3.0, 4.0, 5.0):
        v.check(now)
    assert reasons == [], "it goes on (and takes the other for dead, as the other takes it)"


def test_a_sign_of_life_from_any_member_resets_the_silence() -> None:
    v, membership, _, reasons = vigil(members=5)
    membership.heard_at = 0.0
    for now in (0.5, 1.0, 2.0, 3.0):
        v.check(now)
    membership.heard_at = 3.5  # (Membership.heard: a frame from any one of them)
    for now in (3.6, 4.0, 5.0, 6.0, 7.0):
        v.check(now)
    assert reasons == []


def test_what_membership_heard_is_when_it_last_heard_from_a_live_member() -> None:
    m: Any = Membership()
    assert m.heard_at is None
    assert m.heard(123, 5.0) is None and m.heard_at is None, "a stranger is no sign of life"
    m.upsert(Peer(123, "fake://123", "meter#123", None, 64, 1 << 20, 0.0))
    assert m.heard(123, 6.0) is not None and m.heard_at == 6.0
    m.clear()
    assert m.heard_at is None, "a new incarnation has heard from nobody yet"
