"""The state machines that matter, as data: one transition table each.

A node's own lifecycle, membership and partition ownership change only through
:func:`transition`, which looks the move up in these tables and refuses any move not listed, so
the code cannot drift from what the README draws: its diagrams are generated from the same
tables (:func:`mermaid`).

The node itself (what one node incarnation is doing in the mesh)::

    joining --joined--> joined --declared_dead--> rejoined --joined--> joined
    joining/joined/rejoined --leave--> leaving --bye--> left
    any but left --refused--> refused                     (the mesh refused this node: fatal)

Peers (what a node believes about another node; SWIM, see :mod:`choreo.runtime.gossip`)::

    alive --silence/suspected--> suspect --silence--> dead      suspect --refuted--> alive
    alive/suspect --leaving--> leaving --bye--> left            any live --confirmed/replaced--> dead

Partitions (what a node does with one partition of its service)::

    owned --rebalance--> draining --drained--> handed_over
    unowned/handed_over --gained--> awaiting --handed_over--> owned
    unowned/handed_over --assigned--> owned          (no live previous owner)
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "NODE_TRANSITIONS",
    "PEER_TRANSITIONS",
    "PARTITION_TRANSITIONS",
    "TABLES",
    "transition",
    "mermaid",
    "IllegalTransition",
]

# (state, event) -> new state
NODE_TRANSITIONS: Mapping[tuple[str, str], str] = {
    ("joining", "joined"): "joined",  # every peer the seeds told of answered (or the seeds stayed silent)
    ("joined", "declared_dead"): "rejoined",  # the mesh declared this incarnation dead: back as a new one
    ("rejoined", "declared_dead"): "rejoined",
    ("joining", "declared_dead"): "rejoined",
    ("rejoined", "joined"): "joined",
    ("joining", "leave"): "leaving",  # stop taking work: finish, hand over, wait for acks
    ("joined", "leave"): "leaving",
    ("rejoined", "leave"): "leaving",
    ("leaving", "declared_dead"): "leaving",  # still leaving, under a new incarnation, to deliver what it holds
    ("leaving", "bye"): "left",
    ("joining", "refused"): "refused",  # the mesh refused this node (a conflicting declaration): it stops
    ("joined", "refused"): "refused",
    ("rejoined", "refused"): "refused",
    ("leaving", "refused"): "refused",
}

PEER_TRANSITIONS: Mapping[tuple[str, str], str] = {
    ("alive", "silence"): "suspect",  # our probe went unanswered, directly and through others (SWIM)
    ("alive", "suspected"): "suspect",  # another node's probe did (gossip)
    ("suspect", "refuted"): "alive",  # it said it is alive, with a newer version than the suspicion's
    ("suspect", "silence"): "dead",  # no refutation within dead_after
    ("alive", "leaving"): "leaving",  # draining: still acks and answers, gets no new work
    ("suspect", "leaving"): "leaving",
    ("leaving", "silence"): "dead",  # suspected while leaving, and no word within dead_after
    ("alive", "confirmed"): "dead",  # gossip: another node declared it dead
    ("suspect", "confirmed"): "dead",
    ("leaving", "confirmed"): "dead",
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


#: every table by the name of what it is about (what the tests walk and the README draws)
TABLES: Mapping[str, Mapping[tuple[str, str], str]] = {
    "node": NODE_TRANSITIONS,
    "peer": PEER_TRANSITIONS,
    "partition": PARTITION_TRANSITIONS,
}


class IllegalTransition(RuntimeError):
    """A move that the table does not list: a bug in the caller, never a peer's fault."""


def transition(table: Mapping[tuple[str, str], str], state: str, event: str) -> str:
    """The state after ``event`` in ``state``; raises :class:`IllegalTransition` if not allowed.

    >>> transition(PEER_TRANSITIONS, "suspect", "refuted")
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


README_START = "<!-- states:start (generated by: python -m choreo.states README.md) -->"
README_END = "<!-- states:end -->"


def readme_section() -> str:
    """The README's state diagrams, drawn from the tables above."""
    return "\n".join(
        [
            README_START,
            "",
            "What a node is doing in the mesh:",
            "",
            "```mermaid",
            mermaid(NODE_TRANSITIONS),
            "```",
            "",
            "What a node believes about a peer:",
            "",
            "```mermaid",
            mermaid(PEER_TRANSITIONS),
            "```",
            "",
            "What a node does with one partition of its service:",
            "",
            "```mermaid",
            mermaid(PARTITION_TRANSITIONS),
            "```",
            "",
            README_END,
        ]
    )


def update_readme(path: str) -> bool:
    """Rewrite the diagrams between the markers of ``path``; returns whether anything changed."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{path}: markers not found; put these two lines where the diagrams go:\n{README_START}\n{README_END}")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    new = head + readme_section() + tail
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return new != text


if __name__ == "__main__":  # pragma: no cover
    import sys

    if len(sys.argv) > 1:
        print("updated" if update_readme(sys.argv[1]) else "up to date")
    else:
        print(readme_section())
