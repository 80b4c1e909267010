"""The state machines that matter, as data: one transition table each.

Membership and partition ownership change only through :func:`transition`, which looks the
move up in these tables and refuses any move not listed, so the code cannot drift from what
the README draws: its diagrams are generated from the same tables (:func:`mermaid`).

Peers (what a node believes about another node)::

    alive --silence--> suspect --silence--> dead          suspect --heard--> alive
    alive/suspect --leaving--> leaving --bye--> left      any live --replaced--> dead

Partitions (what a node does with one partition of its service)::

    owned --rebalance--> draining --drained--> handed_over
    unowned/handed_over --gained--> awaiting --handed_over--> owned
    unowned/handed_over --assigned--> owned          (no live previous owner)
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["PEER_TRANSITIONS", "PARTITION_TRANSITIONS", "transition", "mermaid", "IllegalTransition"]

# (state, event) -> new state
PEER_TRANSITIONS: Mapping[tuple[str, str], str] = {
    ("alive", "heard"): "alive",
    ("alive", "silence"): "suspect",
    ("suspect", "heard"): "alive",
    ("suspect", "silence"): "dead",
    ("alive", "leaving"): "leaving",  # draining: still acks and answers, gets no new work
    ("suspect", "leaving"): "leaving",
    ("leaving", "heard"): "leaving",
    ("leaving", "silence"): "dead",
    ("alive", "bye"): "left",
    ("suspect", "bye"): "left",
    ("leaving", "bye"): "left",
    ("alive", "replaced"): "dead",
    ("suspect", "replaced"): "dead",
    ("leaving", "replaced"): "dead",
}

PARTITION_TRANSITIONS: Mapping[tuple[str, str], str] = {
    ("unowned", "assigned"): "owned",  # nobody had it (first instance, or its owner is gone)
    ("unowned", "gained"): "awaiting",  # a live previous owner drains it first
    ("handed_over", "assigned"): "owned",
    ("handed_over", "gained"): "awaiting",
    ("awaiting", "handed_over"): "owned",  # the previous owner's drain is done; its dedup ids came along
    ("awaiting", "previous_gone"): "owned",  # the previous owner died: nothing left to wait for
    ("awaiting", "timeout"): "owned",
    ("awaiting", "lost"): "unowned",  # the view changed again before the handover
    ("owned", "rebalance"): "draining",  # finish what is started, redirect new arrivals
    ("draining", "drained"): "handed_over",
    ("draining", "assigned"): "owned",  # moved back before the drain finished
}


class IllegalTransition(RuntimeError):
    """A move that the table does not list: a bug in the caller, never a peer's fault."""


def transition(table: Mapping[tuple[str, str], str], state: str, event: str) -> str:
    """The state after ``event`` in ``state``; raises :class:`IllegalTransition` if not allowed.

    >>> transition(PEER_TRANSITIONS, "suspect", "heard")
    'alive'
    """
    try:
        return table[(state, event)]
    except KeyError:
        raise IllegalTransition(f"no transition from {state!r} on {event!r}") from None


def mermaid(table: Mapping[tuple[str, str], str], title: str = "") -> str:
    """A Mermaid ``stateDiagram-v2`` of a table (used to generate the README's diagrams)."""
    lines = ["stateDiagram-v2"]
    if title:
        lines.insert(0, f"---\ntitle: {title}\n---")
    for (state, event), new in table.items():
        if state != new:
            lines.append(f"    {state} --> {new}: {event}")
    return "\n".join(lines)
