"""The node's numbers: counters the runtime's parts bump, and the frozen record a caller reads.

:class:`Counters` is the one mutable place each counter lives (parts share the object, nothing
counts twice). :class:`NodeStats` is what :meth:`choreo.node.Node.stats` returns: a frozen
snapshot, cheap to take, easy to print, and :meth:`NodeStats.to_dict` is the JSON that
``choreo top`` and ``/metrics`` read (the ``stats`` system query)::

    stats = node.stats()
    print(stats.processed, stats.in_flight, stats.refused.get("malformed", 0))
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Counters", "NodeStats", "PeerStats"]


@dataclass
class Counters:
    """Counters of one node (they only grow), shared by the runtime's parts."""

    frames_in: int = 0
    frames_out: int = 0
    emitted: int = 0  # events published from outside handlers
    sent: int = 0  # commands and queries sent from outside handlers
    backpressure_waits: int = 0
    backpressure_errors: int = 0
    reincarnations: int = 0
    resent_requests: int = 0  # commands/queries acked without their answer (its frame was lost)
    redelivered_closed: int = 0  # retransmissions on channels that are gone (so the total only grows)
    unrouted: int = 0
    forwarded: int = 0
    redials: int = 0  # connections to a member dialled afresh: a probe of it got no answer of its own
    refused: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class PeerStats:
    """One peer as this node sees it."""

    node: str
    state: str
    service: str | None
    endpoint: str


@dataclass(frozen=True)
class NodeStats:
    """Counters and gauges of one node at one moment (see the module docstring).

    Counters: ``received``/``processed`` (ingestion and completion of handled messages),
    ``failed_attempts``, ``dead_lettered``, ``duplicates`` (acknowledged without running the
    handler), ``emitted``/``sent`` (from outside handlers), ``redelivered``, the backpressure
    counts, ``unrouted``, ``forwarded``, ``reincarnations``, ``resent_requests``, frames in and
    out, ``redials`` (connections to a member dialled afresh: a probe of it got no answer of its
    own), and ``refused`` by reason. Gauges: ``in_handler``, ``in_flight`` (sent, not yet
    acknowledged, or waiting for credit or an instance), ``dead_letters`` (in the store),
    ``lag`` (received, not yet handled, by partition), ``partitions`` (by state), ``holds``,
    ``kept`` (copies kept beyond their ack for receivers that acknowledged those messages before
    they were done, until they are: see :meth:`~choreo.runtime.channels.OutChannel.keep`).
    ``owed``: messages another node handled whose outputs this node owes (a standby's, a new
    owner's), held until they are acknowledged (see :mod:`~choreo.runtime.owed`).
    ``relieved`` (a counter): messages this node acknowledged before their outputs were, their
    senders keeping copies, to free a channel whose credit they held (see
    :mod:`~choreo.runtime.relief`).
    ``store``: a durable node's data dir, fsync policy, lives, commits and syncs and their mean
    times, bytes on disk (``bytes``: the files; ``used_bytes``: the pages in use), dedup ids kept,
    and why commits fail if they do (empty without a data dir). ``handler_state`` (a service that
    declares state): ``keys`` held, ``moves`` (streams of partitions sent, received, refused, their
    entries and bytes) and, with ``replicas=1``, ``replicas`` (owned partitions, how many have a
    complete standby copy, copies and deltas sent and applied).
    """

    node: str
    service: str | None
    incarnation: str
    endpoint: str
    state: str
    time: float
    received: int
    processed: int
    failed_attempts: int
    dead_letters: int
    dead_lettered: int
    duplicates: int
    in_handler: int
    lag: Mapping[int, int]
    emitted: int
    sent: int
    in_flight: int
    redelivered: int
    backpressure_waits: int
    backpressure_errors: int
    unrouted: int
    forwarded: int
    reincarnations: int
    resent_requests: int
    partitions: Mapping[str, int]
    holds: int
    refused: Mapping[str, int]
    frames_in: int
    frames_out: int
    peers: tuple[PeerStats, ...]
    store: Mapping[str, Any] = field(default_factory=dict)
    handler_state: Mapping[str, Any] = field(default_factory=dict)  # ctx.state: keys, moves, standby copies
    kept: int = 0
    relieved: int = 0
    owed: int = 0
    redials: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The ``stats`` system query's JSON (what ``choreo top`` and ``/metrics`` read)."""
        out = asdict(self)
        out["lag"] = dict(self.lag)
        out["partitions"] = dict(self.partitions)
        out["refused"] = dict(self.refused)
        out["store"] = dict(self.store)
        out["handler_state"] = dict(self.handler_state)
        out["dedup_hits"] = self.duplicates  # the name /metrics has always used for it
        out["peers"] = {p.node: {"state": p.state, "service": p.service, "endpoint": p.endpoint} for p in self.peers}
        return out
