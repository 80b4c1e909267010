"""The delivery core: the compiled ``choreo._core``, or on purpose its pure-Python twin.

Importing this module picks the implementation once:

* by default the compiled core; if it is not built, the import fails with the command that
  builds it (a broken build must never hide behind the slow fallback);
* ``CHOREO_PURE=1`` selects the twin ``choreo._pycore`` (the reference model).

``IMPLEMENTATION`` says which one is in use (``"compiled"`` or ``"pure"``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

if os.environ.get("CHOREO_PURE") == "1":
    from . import _pycore as _impl
else:
    try:
        from . import _core as _impl  # type: ignore[no-redef]
    except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
        raise ImportError(
            "choreo._core is not built: run 'pip install -e .' (or 'make test', which does it) "
            "in the choreo checkout, or set CHOREO_PURE=1 to use the pure-Python core"
        ) from exc

IMPLEMENTATION: str = _impl.IMPLEMENTATION
ACCEPTED = _impl.ACCEPTED
DUPLICATE = _impl.DUPLICATE
BEYOND_WINDOW = _impl.BEYOND_WINDOW
HEADER_SIZE = _impl.HEADER_SIZE
MAX_ACK_RANGES = _impl.MAX_ACK_RANGES
MalformedFrame = _impl.MalformedFrame
Envelope = _impl.Envelope
WindowStats = _impl.WindowStats
ReorderStats = _impl.ReorderStats
DedupStats = _impl.DedupStats
OutboundWindow = _impl.OutboundWindow
InboundReorder = _impl.InboundReorder
DedupWindow = _impl.DedupWindow
KeyedDispatch = _impl.KeyedDispatch
pack_envelope = _impl.pack_envelope
parse_envelopes = _impl.parse_envelopes
encode_ack = _impl.encode_ack
decode_ack = _impl.decode_ack
decode_replies = _impl.decode_replies
hash64 = _impl.hash64
hash128 = _impl.hash128
derive_id = _impl.derive_id
partition_of = _impl.partition_of
rendezvous_owner = _impl.rendezvous_owner
assign_partitions = _impl.assign_partitions
IdSource = _impl.IdSource
EmitLane = _impl.EmitLane
EmitTable = _impl.EmitTable
FastLane = _impl.FastLane
StateView = _impl.StateView
SpanRing = _impl.SpanRing
KIND_EVENT = _impl.KIND_EVENT
FLAG_UNKEYED = _impl.FLAG_UNKEYED
FLAG_BROADCAST = _impl.FLAG_BROADCAST
FLAG_REPLAY = _impl.FLAG_REPLAY
SPAN_KEY_BYTES = _impl.SPAN_KEY_BYTES
LANE_END = _impl.LANE_END
LANE_SLOW = _impl.LANE_SLOW
LANE_DUPLICATE = _impl.LANE_DUPLICATE
LANE_BAD = _impl.LANE_BAD
LANE_FAILED = _impl.LANE_FAILED
LANE_EFFECTS = _impl.LANE_EFFECTS
LANE_BATCH_FAILED = _impl.LANE_BATCH_FAILED
LANE_RESULT = _impl.LANE_RESULT
LANE_LATE = _impl.LANE_LATE
EMIT_END = _impl.EMIT_END
EMIT_OTHER = _impl.EMIT_OTHER
EMIT_BLOCKED = _impl.EMIT_BLOCKED
EMIT_INVALID = _impl.EMIT_INVALID

_C_MONOTONIC: Any = None
if IMPLEMENTATION == "compiled":  # (built with the core: a build without it is broken, and says so)
    from ._clock import MONOTONIC as _C_MONOTONIC


def lane_clock(clock: Callable[[], float]) -> Any:
    """What to hand ``FastLane.run`` as its clock: ``clock`` itself, or, when it is
    ``time.monotonic`` and the compiled core runs, the same clock as a C function
    (``choreo._clock.MONOTONIC``: no Python call and no float per reading).

    >>> lane_clock(lambda: 0.0)() == 0.0
    True
    """
    return _C_MONOTONIC if clock is time.monotonic and _C_MONOTONIC is not None else clock

__all__ = [
    "IMPLEMENTATION",
    "ACCEPTED",
    "DUPLICATE",
    "BEYOND_WINDOW",
    "HEADER_SIZE",
    "MAX_ACK_RANGES",
    "MalformedFrame",
    "Envelope",
    "WindowStats",
    "ReorderStats",
    "DedupStats",
    "OutboundWindow",
    "InboundReorder",
    "DedupWindow",
    "KeyedDispatch",
    "pack_envelope",
    "parse_envelopes",
    "encode_ack",
    "decode_ack",
    "decode_replies",
    "hash64",
    "hash128",
    "derive_id",
    "partition_of",
    "rendezvous_owner",
    "assign_partitions",
    "IdSource",
    "EmitLane",
    "EmitTable",
    "FastLane",
    "StateView",
    "SpanRing",
    "KIND_EVENT",
    "FLAG_UNKEYED",
    "FLAG_BROADCAST",
    "FLAG_REPLAY",
    "SPAN_KEY_BYTES",
    "LANE_END",
    "LANE_SLOW",
    "LANE_DUPLICATE",
    "LANE_BAD",
    "LANE_FAILED",
    "LANE_EFFECTS",
    "LANE_BATCH_FAILED",
    "LANE_RESULT",
    "LANE_LATE",
    "EMIT_END",
    "EMIT_OTHER",
    "EMIT_BLOCKED",
    "EMIT_INVALID",
    "lane_clock",
]
