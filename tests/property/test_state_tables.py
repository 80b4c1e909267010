"""Every (state, event) pair of every transition table, and the objects that follow them.

As h2 does for its state machines: each table is checked for every state and every event it
names, the allowed moves land where the table says and every other pair is refused with
:class:`IllegalTransition`; hypothesis then drives the objects that own the states (a node's
:class:`Lifecycle`, a :class:`Membership`'s peers, an :class:`Ownership`'s partitions) through
arbitrary sequences of what can happen to them, and checks they never leave their table.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from choreo import wire
from choreo.runtime.lifecycle import Lifecycle
from choreo.runtime.membership import Membership, Peer
from choreo.runtime.ownership import Ownership
from choreo.states import TABLES, IllegalTransition, transition

INITIAL = {"node": "joining", "peer": "alive", "partition": "unowned"}
TERMINAL = {"node": {"left", "refused"}, "peer": {"dead", "left"}, "partition": set()}


def _states(table):  # type: ignore[no-untyped-def]
    return sorted({s for s, _ in table} | set(table.values()))


def _events(table):  # type: ignore[no-untyped-def]
    return sorted({e for _, e in table})


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_state_event_pair_moves_as_listed_or_is_refused(name: str) -> None:
    table = TABLES[name]
    for state, event in itertools.product(_states(table), _events(table)):
        if (state, event) in table:
            assert transition(table, state, event) == table[(state, event)]
        else:
            with pytest.raises(IllegalTransition, match=f"no transition from '{state}' on '{event}'"):
                transition(table, state, event)


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_state_is_reachable_and_only_terminal_states_are_dead_ends(name: str) -> None:
    table = TABLES[name]
    reached, frontier = {INITIAL[name]}, [INITIAL[name]]
    while frontier:
        state = frontier.pop()
        for (s, _), new in table.items():
            if s == state and new not in reached:
                reached.add(new)
                frontier.append(new)
    assert reached == set(_states(table)), f"unreachable: {set(_states(table)) - reached}"
    dead_ends = {s for s in _states(table) if not any(src == s and new != s for (src, _), new in table.items())}
    assert dead_ends == TERMINAL[name]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(sorted({e for _, e in TABLES["node"]})), max_size=30))
def test_a_node_lifecycle_follows_its_table_whatever_happens(events: list[str]) -> None:
    life = Lifecycle()
    for t, event in enumerate(events):
        before = life.state
        if (before, event) in TABLES["node"]:
            assert life.on(event, float(t)) == TABLES["node"][(before, event)]
            assert life.since == float(t)
        else:
            with pytest.raises(IllegalTransition):
                life.on(event, float(t))
            assert life.state == before, "a refused move changes nothing"
        assert life.joined == (life.state in ("joined", "leaving"))


PEER_OPS = st.lists(
    st.tuples(
        st.sampled_from(["heard", "leaving", "bye", "suspect", "expire", "gossip", "replace"]),
        st.integers(0, 3),
        st.integers(0, len(wire.MEMBER_STATES) - 1),
        st.integers(0, 3),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(PEER_OPS)
def test_peers_only_move_along_their_table_and_the_digests_follow(ops: list[tuple[str, int, int, int]]) -> None:
    m = Membership()
    for inc in range(1, 5):
        m.upsert(Peer(inc, f"e{inc}", f"n{inc}", None, 1, 1, 0.0))
    incarnations = 100
    for now, (op, idx, state, version) in enumerate(ops):
        before = {inc: p.state for inc, p in m.peers.items()}
        inc = list(m.peers)[idx % len(m.peers)]
        peer = m.peers[inc]
        if op == "heard":
            m.heard(inc, float(now))
        elif op == "leaving":
            m.leaving(inc)
        elif op == "bye":
            m.left(inc)
        elif op == "suspect":  # our probe of it went unanswered
            m.suspect(inc)
        elif op == "expire":  # a suspicion ran out
            m.expire(inc)
        elif op == "gossip":  # what another node says of it (any state, any version)
            m.merge(wire.Member(inc, version, state, peer.endpoint, peer.node), float(now))
        else:  # a new incarnation at the same endpoint
            incarnations += 1
            m.upsert(Peer(incarnations, peer.endpoint, "again", None, 1, 1, float(now)))
        for i, p in m.peers.items():
            was = before.get(i)
            if was is not None and was != p.state:
                assert any(TABLES["peer"].get((was, e)) == p.state for e in _events(TABLES["peer"])), (
                    f"{was} -> {p.state} is not in the peer table"
                )
        # the digests anti-entropy compares are kept up to date, change by change
        fresh = Membership()
        for p in m.peers.values():
            if p.live:
                fresh.upsert(Peer(p.incarnation, p.endpoint, p.node, None, 1, 1, 0.0, version=p.version))
        assert m.buckets == fresh.buckets and m.live_count == fresh.live_count


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["view", "handover", "gone", "expire", "drained"]),
            st.frozensets(st.integers(1, 5), max_size=5),
            st.integers(0, 7),
        ),
        max_size=25,
    )
)
def test_partitions_only_move_along_their_table(ops: list[tuple[str, frozenset[int], int]]) -> None:
    o = Ownership(partitions=8, me=1)
    now = 0.0
    for op, others, p in ops:
        before = list(o.state)
        now += 1.0
        if op == "view":
            view = sorted({1, *others})
            o.update(view, live=lambda inc: True, now=now, holder=lambda p, view=view: view[p % len(view)])
        elif op == "handover":
            o.handed_over(p, now)
        elif op == "gone":
            o.previous_gone(min(others) if others else 2)
        elif op == "expire":
            o.expire(now, timeout=2.0)
        elif p in o.draining:
            o.drained(p)
        for q, (was, new) in enumerate(zip(before, o.state)):
            if was != new:
                assert any(TABLES["partition"].get((was, e)) == new for e in _events(TABLES["partition"])), (
                    f"partition {q}: {was} -> {new} is not in the partition table"
                )
            assert o.gate[q] == (new == "owned"), "arrivals run here exactly when the partition is owned"
