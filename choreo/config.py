"""How one node is tuned: :class:`NodeConfig`, a frozen record checked when it is built.

It lives on its own, below everything that reads it (the runtime, the node, the launchers, the
bench), so that importing the settings never imports the machinery they tune::

    from choreo import NodeConfig
    config = NodeConfig(window=1000, emit_timeout=5.0)
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields
from typing import Any

from .errors import ChoreoUsageError

__all__ = ["NodeConfig", "timeout_seconds"]


@dataclass(frozen=True)
class NodeConfig:
    """Tuning of one node. The defaults suit a LAN; every limit is also a safety bound.

    ``window`` / ``window_bytes``: credit per channel (envelopes and bytes in flight to one
    receiver): the high-water mark at which ``emit`` waits. ``emit_timeout``: how long it
    waits before raising :class:`~choreo.Backpressure`. ``max_message_bytes``: the largest
    body accepted or sent. ``rto``/``rto_max``: first and largest retransmission timeout.
    ``tick``: how often a node looks at its work while it has some (handlers running, hand-overs,
    a commit due, callers waiting on a condition); what is only in flight wakes it by its own
    deadlines (a retransmission, an answer's timeout), and at least every ``rto / 8``.

    Membership (SWIM, :mod:`choreo.runtime.gossip`): ``heartbeat`` is the protocol period, in
    which a node probes one member; a probe unanswered for ``suspect_after`` (directly for half
    of it, then through ``indirect_probes`` other members) makes its target suspect, and a
    suspicion the member does not refute within ``dead_after`` makes it dead: a crashed node is
    dead everywhere about ``suspect_after + dead_after`` (plus a period or two) after it crashed.
    More indirect probes and a longer ``suspect_after`` make false suspicions on a lossy network
    rarer; ``dead_after`` is how long a falsely suspected node has to refute.
    ``max_connections``: sockets a node keeps open to peers (it dials on demand, closes those
    unused for a minute, and beyond this many the least recently used). ``span_ring``: how many
    spans the node remembers for tracing (0: none). ``handover_timeout``: how long a new owner
    of a partition waits for its live previous owner's handover before taking it anyway, and
    for a durable previous owner taken for dead to come back with its store.
    ``dedup=False`` turns deduplication off on this node (at-least-once: for measuring what it
    costs, or for handlers that are idempotent by themselves). ``dlq_max`` / ``dlq_max_bytes``:
    the dead letters a node keeps (by count and by bytes of payload, error and traceback; the
    oldest go first, counted). ``max_state_bytes``: the largest state value a handler may
    write (``ctx.state``); ``max_partition_bytes``: the most a partition's state stream may
    carry to this node (a new owner or a standby stages that much before it installs it).
    ``standby_gate_timeout``: how long a handler's state writes may wait for its outputs'
    acknowledgements before they go to the standby anyway, when a later write of the same key,
    of another flow, waits behind them (two flows that wait for each other: see the README's
    Handler state; a flow that comes back to a key it wrote does not wait for this).
    ``max_members_per_key`` (with keys): the live members one key may have here at once; a hello
    beyond them is refused, so that a stolen key cannot fill the membership table by joining
    under endpoint after endpoint (raise it if more instances than that share one key).

    >>> NodeConfig(window=0)
    Traceback (most recent call last):
    ...
    choreo.errors.ChoreoUsageError: NodeConfig.window must be > 0, got 0
    """

    window: int = 4096
    window_bytes: int = 32 << 20
    max_batch: int = 256
    max_batch_bytes: int = 256 << 10
    rto: float = 1.0
    rto_max: float = 8.0
    heartbeat: float = 0.5
    suspect_after: float = 1.0
    dead_after: float = 5.0
    indirect_probes: int = 3
    max_connections: int = 256
    max_message_bytes: int = 1 << 20
    emit_timeout: float = 10.0
    request_timeout: float = 10.0
    drain_timeout: float = 30.0
    tick: float = 0.01
    dlq_max: int = 10_000
    dlq_max_bytes: int = 64 << 20
    span_ring: int = 10_000
    handover_timeout: float = 15.0
    forget_dead_after: float = 600.0
    dedup: bool = True
    max_state_bytes: int | None = None  # default: 256 KiB, or half of max_message_bytes if less
    max_partition_bytes: int = 1 << 30
    standby_gate_timeout: float = 5.0
    max_members_per_key: int = 1024

    def __post_init__(self) -> None:
        if self.max_state_bytes is None:
            object.__setattr__(self, "max_state_bytes", max(1, min(256 << 10, self.max_message_bytes // 2)))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("span_ring", "dedup", "indirect_probes"):
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
                raise ChoreoUsageError(f"NodeConfig.{f.name} must be > 0, got {value!r}")
        if self.indirect_probes < 0:
            raise ChoreoUsageError(f"NodeConfig.indirect_probes must be >= 0, got {self.indirect_probes!r}")
        if self.window > 1 << 20:
            raise ChoreoUsageError(f"NodeConfig.window must be at most 1048576, got {self.window}")
        if self.max_state_bytes > self.max_message_bytes // 2:  # type: ignore[operator]
            raise ChoreoUsageError(
                "NodeConfig.max_state_bytes must be at most half of max_message_bytes (one key's changes travel "
                "in one message, with the message that made them)"
            )
        if not self.suspect_after < self.dead_after:
            raise ChoreoUsageError("NodeConfig.suspect_after must be smaller than dead_after")
        if not 2 * self.heartbeat < self.suspect_after + self.dead_after:
            raise ChoreoUsageError(
                f"NodeConfig.heartbeat ({self.heartbeat} s, the protocol period) must be shorter than half of "
                f"suspect_after + dead_after ({self.suspect_after + self.dead_after} s): an idle node sleeps up to a "
                "period, and a sleep that long would look like a freeze the mesh took for a death"
            )

    @property
    def max_frame_bytes(self) -> int:
        """The largest frame accepted: a full batch plus one maximal message."""
        return self.max_batch_bytes + self.max_message_bytes + 64 * 1024


def timeout_seconds(value: Any, verb: str) -> float:
    """A verb's ``timeout`` as seconds: a real number >= 0 (``math.inf``: no limit). Anything
    else (a string, NaN, a negative number) is a ChoreoUsageError naming the verb, raised before
    anything is sent: a negative timeout used to send a command and then report, at once, that
    it had no answer, while it ran.

    >>> timeout_seconds(2, "send")
    2.0
    >>> timeout_seconds(-1, "send")
    Traceback (most recent call last):
    ...
    choreo.errors.ChoreoUsageError: send: timeout must be a number of seconds >= 0, got -1
    """
    kind = type(value)
    # float and int first: the ABC check costs about 0.3 us, on every send, ask and timed emit
    if kind is float or kind is int or (isinstance(value, numbers.Real) and kind is not bool):
        seconds = float(value)
        if seconds >= 0:  # (NaN is not)
            return seconds
    raise ChoreoUsageError(f"{verb}: timeout must be a number of seconds >= 0, got {value!r}")
