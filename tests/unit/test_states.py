"""The state tables are the only place the transitions live, and the README draws them."""

from __future__ import annotations

from pathlib import Path

import pytest

from choreo.states import PARTITION_TRANSITIONS, PEER_TRANSITIONS, IllegalTransition, readme_section, transition
from choreo.runtime.ownership import Ownership

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_diagrams_are_generated_from_the_tables() -> None:
    assert readme_section() in README.read_text(), (
        "README.md's state diagrams differ from choreo/states.py: run 'python -m choreo.states README.md'"
    )


def test_moves_outside_the_table_are_refused() -> None:
    with pytest.raises(IllegalTransition, match="no transition from 'left' on 'heard'"):
        transition(PEER_TRANSITIONS, "left", "heard")
    with pytest.raises(IllegalTransition):
        transition(PARTITION_TRANSITIONS, "awaiting", "rebalance")


def test_a_join_moves_only_the_newcomers_share_and_the_newcomer_waits_for_handovers() -> None:
    old = Ownership(partitions=64, me=1)
    old.update([1, 2], live=lambda i: True, now=0.0)  # started together: nobody held anything
    mine_before = {p for p, s in enumerate(old.state) if s == "owned"}
    old.update([1, 2, 3], live=lambda i: True, now=1.0)
    draining = set(old.draining)
    assert draining and draining <= mine_before, "only partitions we owned move, to the newcomer"
    assert set(old.draining.values()) == {3}

    newcomer = Ownership(partitions=64, me=3)
    # instance 1 holds what it owns or drains, instance 2 the rest
    newcomer.update([1, 2, 3], live=lambda i: True, now=1.0, holder=lambda p: 1 if old.holding()[p >> 3] >> (p & 7) & 1 else 2)
    assert set(newcomer.awaiting) == {p for p, o in enumerate(newcomer.owners) if o == 3}
    assert not any(s == "owned" for s in newcomer.state), "nothing runs before its handover"
    p = next(iter(newcomer.awaiting))
    assert newcomer.handed_over(p, now=2.0) and newcomer.state[p] == "owned"
    # a previous owner that dies is not waited for
    prev = newcomer.awaiting[next(iter(newcomer.awaiting))][1]
    gone = newcomer.previous_gone(prev)
    assert gone and all(newcomer.state[q] == "owned" for q in gone)


def test_a_restarted_durable_node_holds_what_its_store_gave_back_until_its_views_place_it() -> None:
    """A durable node read partitions' state back from its store; instances start beside it."""
    back = Ownership(partitions=32, me=1)
    back.restored = set(range(32))  # it held everything before it stopped
    held = back.holding()
    assert all(held[p >> 3] >> (p & 7) & 1 for p in range(32)), "held from its first hello"
    # a newcomer sees it holding: what the view gives the newcomer waits for its hand-over
    newcomer = Ownership(partitions=32, me=2)
    newcomer.update([1, 2], live=lambda i: True, now=0.0, holder=lambda p: 1 if held[p >> 3] >> (p & 7) & 1 else None)
    theirs = {p for p, o in enumerate(newcomer.owners) if o == 2}
    assert theirs and set(newcomer.awaiting) == theirs and not any(s == "owned" for s in newcomer.state)
    # the restarted node keeps its own share and drains the rest to the newcomer, as a move would
    back.update([1, 2], live=lambda i: True, now=0.0)
    assert {p for p, s in enumerate(back.state) if s == "owned"} == set(range(32)) - theirs
    assert back.draining == {p: 2 for p in theirs} and not back.restored and not back.stale
    # a partition another live instance holds is newer there: what the store gave back is stale
    other = Ownership(partitions=32, me=1)
    other.restored = set(range(32))
    other.update([1, 2], live=lambda i: True, now=0.0, holder=lambda p: 2)
    mine = {p for p, o in enumerate(other.owners) if o == 1}
    assert set(other.awaiting) == mine, "its own share comes back from the instance that has it"
    assert set(other.stale) == set(range(32)) - mine and not other.draining


def test_each_new_owner_raises_the_partitions_epoch_above_the_one_it_inherited() -> None:
    """Epochs order copies of a partition: at least the wall clock in ms, and always above the
    copy taken over (a clock behind, or a hand-over from a clock ahead, cannot lower them)."""
    wall = [100.0]
    kept: dict[int, int] = {}
    first = Ownership(partitions=4, me=1, wall=lambda: wall[0], on_epoch=kept.__setitem__)
    first.update([1], live=lambda i: True, now=0.0)
    assert first.epochs == [100_000] * 4 and kept == {p: 100_000 for p in range(4)}, "kept as they change"
    wall[0] = 50.0  # the clock went back: the next owner still ranks newer
    first.update([], live=lambda i: True, now=1.0)  # it left as the last instance: drained to nobody
    for p in range(4):
        first.drained(p)
    first.update([1], live=lambda i: True, now=2.0)  # and came back
    assert first.epochs == [100_001] * 4
    first.restored = {0}
    assert first.restored_epochs() == [(0, 100_001)], "what it read back is advertised with its epoch"
    # a hand-over carries its sender's epoch: the receiver starts above it, its clock behind or not
    second = Ownership(partitions=4, me=2, wall=lambda: 1.0)
    second.update([1, 2], live=lambda i: True, now=3.0, holder=lambda p: 1)
    p = next(iter(second.awaiting))
    second.set_epoch(p, first.epochs[p])  # (PartitionData.install, from the stream)
    assert second.handed_over(p, now=4.0) and second.epochs[p] == 100_002


def test_a_partition_whose_owner_is_gone_waits_for_its_standby_copy() -> None:
    """replicas=1: instance 1 owned everything, 2 kept the copies; 1 crashed and came back at
    once as 3. What 3 wins has no holder, but 2's copy is its state: 3 waits for it."""
    newcomer = Ownership(partitions=32, me=3)
    newcomer.update([2, 3], live=lambda i: i != 1, now=0.0, keeper=lambda p: 2)
    theirs = {p for p, o in enumerate(newcomer.owners) if o == 3}
    assert theirs and set(newcomer.awaiting) == theirs and not any(s == "owned" for s in newcomer.state)
    assert {prev for _, prev in newcomer.awaiting.values()} == {2}
    # without a copy anywhere, it starts them at once, as before
    alone = Ownership(partitions=32, me=3)
    alone.update([2, 3], live=lambda i: i != 1, now=0.0)
    assert not alone.awaiting and {p for p, s in enumerate(alone.state) if s == "owned"} == theirs
    # a node that has the data itself (its copy became its own: restored) does not wait for others
    keeper = Ownership(partitions=32, me=2)
    keeper.restored = set(range(32))
    keeper.update([2, 3], live=lambda i: i != 1, now=0.0, keeper=lambda p: 4)
    mine = set(range(32)) - theirs
    assert {p for p, s in enumerate(keeper.state) if s == "owned"} == mine
    assert keeper.draining == {p: 3 for p in theirs}, "the rest of the copy goes to the newcomer, as a drain"


def test_a_previous_owner_that_dies_hands_the_wait_to_its_standby_copy() -> None:
    gainer = Ownership(partitions=16, me=3)
    gainer.update([1, 3], live=lambda i: True, now=0.0, holder=lambda p: 1)
    waiting = set(gainer.awaiting)
    assert waiting
    assert gainer.previous_gone(1, keeper=lambda p: 2) == [], "its standby has the state: wait for that"
    assert set(gainer.awaiting) == waiting and {prev for _, prev in gainer.awaiting.values()} == {2}
    assert gainer.previous_gone(2, keeper=lambda p: None) == sorted(waiting), "the copy is gone too: start"
    assert all(gainer.state[p] == "owned" for p in waiting)


def test_instances_starting_together_split_partitions_at_once() -> None:
    a, b = Ownership(partitions=32, me=1), Ownership(partitions=32, me=2)
    a.update([1, 2], live=lambda i: True, now=0.0)
    b.update([1, 2], live=lambda i: True, now=0.0)
    assert not a.awaiting and not b.awaiting
    assert all((x == "owned") != (y == "owned") for x, y in zip(a.state, b.state))


def test_a_latecomer_takes_at_once_what_nobody_holds() -> None:
    """Two instances start a moment apart: the first takes only its share (the second is in its
    view), so the second must not wait for handovers of partitions the first never held."""
    a, b = Ownership(partitions=32, me=1), Ownership(partitions=32, me=2)
    a.update([1, 2], live=lambda i: True, now=0.0)
    held = a.holding()
    b.update([1, 2], live=lambda i: True, now=1.0, holder=lambda p: 1 if held[p >> 3] >> (p & 7) & 1 else None)
    assert not b.awaiting, "nobody holds b's share: it is b's at once"
    assert all((x == "owned") != (y == "owned") for x, y in zip(a.state, b.state))
