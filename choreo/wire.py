"""The wire format between nodes: one ZeroMQ message is one frame.

Every frame opens with a fixed 24-byte header, then a body whose meaning depends on the type::

    0  4s  magic b"CHRO"      4  u8  version (1)     5  u8  frame type    6  u16 flags
    8  u64 sender incarnation                        16 u64 receiver incarnation (0: any)

``DATA`` bodies are batches of envelopes (layout in ``choreo/_pycore.py``), handled by the
compiled core without a copy. ``ACK`` bodies are the core's ack encoding. ``REPLY`` bodies are
the answers to commands and queries, each ``16s msg_id | u8 type_len | type | u32 len | body``.
A ``DATA`` or ``REPLY`` frame with ``FLAG_ACK`` set starts with ``u16 len | ack``: the sender's
ack of what it received from the receiver rides along instead of taking a frame of its own. Control bodies
(``HELLO``, ``HEARTBEAT``, ``BYE``, ``REFUSE``, ``RPC``, ``RPC_REPLY``) are MessagePack maps
decoded into the structs below, so a malformed or hostile body fails validation instead of
reaching the runtime. Nothing here is ever unpickled.

An incarnation is a random 64-bit id a node draws at start: a restarted process on the same
address is a new incarnation, and a frame addressed to an old one is refused, so state
belonging to a previous life can never be confused with the present one.

Endpoints. A node's address is ``tcp://HOST:PORT``, ``ipc://PATH`` or ``inproc://NAME``; a node
of a secure mesh is addressed as ``KEY@tcp://HOST:PORT``, where KEY names the trusted
certificate whose secret that node holds (:mod:`choreo.trust`). The key travels inside the
address, so every place that stores or gossips an endpoint (hellos, peer lists, seeds, the CLI's
``--peer``) also knows which server key to expect there, as libp2p's addresses carry a peer id;
a dialer only ever uses a key from its own trusted directory, so a gossiped address can point
at a key but never introduce one. :func:`~choreo.endpoints.split_endpoint` and
:func:`~choreo.endpoints.endpoint_problem` read them.

Bounds. Control bodies are checked at the door: a body larger than its type allows is refused
before it is decoded (:data:`MAX_CONTROL_BYTES`), a hello or heartbeat lists at most
:data:`MAX_PEERS` peers, every endpoint in them must parse, and a service declares 1..65535
partitions. Each violation is a :class:`ProtocolError` with its reason.
"""

from __future__ import annotations

import struct
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from . import core
from .endpoints import MAX_ENDPOINT, endpoint_problem, split_endpoint
from .errors import ProtocolError
from .spec import ServiceSpec

__all__ = [
    "VERSION",
    "HEADER",
    "DATA",
    "ACK",
    "HELLO",
    "HEARTBEAT",
    "BYE",
    "REFUSE",
    "RPC",
    "RPC_REPLY",
    "REPLY",
    "FLAG_ACK",
    "FRAME_NAMES",
    "PeerRef",
    "Hello",
    "Heartbeat",
    "Bye",
    "Refuse",
    "Rpc",
    "RpcReply",
    "frame",
    "parse_header",
    "encode_control",
    "decode_control",
    "KIND_EVENT",
    "KIND_COMMAND",
    "KIND_QUERY",
    "KIND_HANDOVER",
    "FLAG_UNKEYED",
    "FLAG_BROADCAST",
    "FLAG_REPLAY",
    "MAX_CONTROL_BYTES",
    "MAX_ENDPOINT",
    "MAX_PEERS",
    "endpoint_problem",
    "split_endpoint",
]

MAGIC = b"CHRO"
VERSION = 1
HEADER = struct.Struct("<4sBBHQQ")
HEADER_SIZE = HEADER.size  # 24

DATA, ACK, HELLO, HEARTBEAT, BYE, REFUSE, RPC, RPC_REPLY, REPLY = range(1, 10)
FRAME_NAMES = {
    REPLY: "reply",
    DATA: "data",
    ACK: "ack",
    HELLO: "hello",
    HEARTBEAT: "heartbeat",
    BYE: "bye",
    REFUSE: "refuse",
    RPC: "rpc",
    RPC_REPLY: "rpc_reply",
}

# frame flags
FLAG_ACK = 0x0001  # the body starts with a piggybacked ack (u16 length, then the ack)
PIGGY = struct.Struct("<H")
REPLY_ENTRY = struct.Struct("<16sB")
REPLY_LEN = struct.Struct("<I")

# envelope kinds (the core's ``kind`` byte); the core's lanes know events by theirs
KIND_EVENT = core.KIND_EVENT
KIND_COMMAND, KIND_QUERY, KIND_HANDOVER = 2, 3, 5  # (4: reserved, was replies)
KIND_NAMES = {
    KIND_EVENT: "event",
    KIND_COMMAND: "command",
    KIND_QUERY: "query",
    KIND_HANDOVER: "handover",  # a drained partition's dedup ids, from its old owner to its new one
}
KIND_CODES = {"event": KIND_EVENT, "command": KIND_COMMAND, "query": KIND_QUERY}

# envelope flags
FLAG_UNKEYED = core.FLAG_UNKEYED  # no ordering key: the receiver runs it without waiting on a key
FLAG_BROADCAST = core.FLAG_BROADCAST  # delivered to every instance of the service (broadcast handler)
FLAG_REPLAY = 0x04  # a dead letter replayed on purpose: bypasses dedup once


# ---------------------------------------------------------------------------------------- endpoints

MAX_PEERS = 1024  # peers listed in one hello or heartbeat: a mesh of up to this many nodes


def _check_endpoints(what: str, endpoint: str | None, peers: list[PeerRef]) -> None:
    if endpoint is not None:
        problem = endpoint_problem(endpoint)
        if problem is not None:
            raise ProtocolError("bad_endpoint", f"{what}: {problem}")
    for i, ref in enumerate(peers):
        problem = endpoint_problem(ref.endpoint)
        if problem is not None:
            raise ProtocolError("bad_endpoint", f"{what}: peer {i}: {problem}")


# ---------------------------------------------------------------------------------------- control bodies

_Endpoint = Annotated[str, Meta(max_length=MAX_ENDPOINT)]
_Incarnation = Annotated[int, Meta(ge=0)]  # a u64 (msgpack rejects larger)
_Name = Annotated[str, Meta(max_length=200)]


class PeerRef(msgspec.Struct, array_like=True, frozen=True):
    """What one node tells another about a third: enough to connect and say hello."""

    endpoint: _Endpoint
    incarnation: _Incarnation
    service: _Name | None = None


_Peers = Annotated[list[PeerRef], Meta(max_length=MAX_PEERS)]


class Hello(msgspec.Struct, frozen=True):
    """A node introduces itself (on connect, and in answer to a hello that asks for one).

    ``services``: the declared services the sender knows that have no live instance it knows
    of (the others a newcomer learns from their instances); ``retired``: services an operator
    retired, which gossip must not bring back.
    """

    node: _Name
    incarnation: _Incarnation
    endpoint: _Endpoint
    service: ServiceSpec | None
    window: Annotated[int, Meta(ge=1, le=1 << 20)]
    max_message_bytes: Annotated[int, Meta(ge=1)]
    peers: _Peers = []
    reply: bool = False
    leaving: bool = False
    holding: bytes = b""  # the partitions the sender owns or drains (a bitmap): a newcomer waits for their handover
    services: list[ServiceSpec] = []
    retired: list[str] = []
    # the sender's rendezvous key when it is not its incarnation: a durable node's, derived from its
    # persisted name, so that its next life owns the same partitions (empty: the incarnation)
    key: Annotated[bytes, Meta(max_length=32)] = b""


class Heartbeat(msgspec.Struct, frozen=True):
    """'I am alive', with the peers the sender knows, so membership spreads by gossip.

    ``ack_please``: the sender still waits for acks from the receiver; the receiver answers
    with its current ack, so a lost final ack costs one heartbeat, never a stalled channel.
    """

    peers: _Peers = []
    leaving: bool = False
    ack_please: bool = False
    holding: bytes = b""
    retired: list[str] = []


class Bye(msgspec.Struct, frozen=True):
    """The sender leaves the mesh on purpose (graceful stop)."""

    reason: str = "stopping"


class Refuse(msgspec.Struct, frozen=True):
    """A frame was not accepted; ``reason`` is a counter token, ``detail`` a sentence.

    ``stale``: the incarnation the refused frame was addressed to (reason ``"stale"``): that one
    is over at this endpoint, the sender should say hello to learn who is there now.
    """

    reason: str
    detail: str = ""
    seqs: list[int] = []
    stale: int = 0


class Rpc(msgspec.Struct, frozen=True):
    """A system query from a client (the CLI) answered by the node itself."""

    id: int
    method: str
    args: dict[str, Any] = {}


class RpcReply(msgspec.Struct, frozen=True):
    id: int
    ok: bool
    result: Any = None
    error: str = ""


_CONTROL_TYPES: dict[int, type[msgspec.Struct]] = {
    HELLO: Hello,
    HEARTBEAT: Heartbeat,
    BYE: Bye,
    REFUSE: Refuse,
    RPC: Rpc,
    RPC_REPLY: RpcReply,
}
_encoder = msgspec.msgpack.Encoder()
_decoders = {t: msgspec.msgpack.Decoder(cls) for t, cls in _CONTROL_TYPES.items()}

#: The largest body of each control frame, refused before decoding. A hello carries the
#: sender's whole service declaration (message types with their JSON schemas) and its peers.
MAX_CONTROL_BYTES = {
    HELLO: 512 << 10,
    HEARTBEAT: 256 << 10,
    BYE: 4 << 10,
    REFUSE: 64 << 10,
    RPC: 64 << 10,
    RPC_REPLY: 1 << 30,  # answers a client asked a node for (spans, dead letters): no cap of ours
}


def frame(frame_type: int, sender: int, receiver: int, body: bytes = b"", flags: int = 0) -> bytes:
    """One complete frame: header + body."""
    return HEADER.pack(MAGIC, VERSION, frame_type, flags, sender, receiver) + body


def parse_header(data: bytes) -> tuple[int, int, int, int]:
    """``(frame type, flags, sender, receiver)``, or :class:`ProtocolError` naming what is wrong."""
    if len(data) < HEADER_SIZE:
        raise ProtocolError("malformed", f"frame of {len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, frame_type, flags, sender, receiver = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError("malformed", f"frame does not start with {MAGIC!r} (got {magic!r}): not a choreo peer")
    if version != VERSION:
        raise ProtocolError("version", f"protocol version {version} is not supported (this node speaks {VERSION})")
    if frame_type not in FRAME_NAMES:
        raise ProtocolError("malformed", f"unknown frame type {frame_type}")
    return frame_type, flags, sender, receiver


def encode_control(frame_type: int, sender: int, receiver: int, body: msgspec.Struct) -> bytes:
    return frame(frame_type, sender, receiver, _encoder.encode(body))


def decode_control(frame_type: int, data: bytes) -> Any:
    """Decode a control frame's body into its struct; :class:`ProtocolError` if invalid.

    Bounded and validated (see "Bounds" above): oversized bodies are refused undecoded
    (reason ``oversized``), endpoints that do not parse as ``bad_endpoint``, anything else
    that does not fit its struct as ``malformed``.
    """
    size = len(data) - HEADER_SIZE
    limit = MAX_CONTROL_BYTES[frame_type]
    if size > limit:
        raise ProtocolError("oversized", f"{FRAME_NAMES[frame_type]} body of {size} bytes, limit {limit}")
    try:
        body = _decoders[frame_type].decode(memoryview(data)[HEADER_SIZE:])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError("malformed", f"{FRAME_NAMES[frame_type]} body: {exc}") from None
    if frame_type == HELLO:
        _check_endpoints(f"hello from {body.node}", body.endpoint, body.peers)
    elif frame_type == HEARTBEAT:
        _check_endpoints("heartbeat", None, body.peers)
    return body


def split_ack(data: bytes, flags: int) -> tuple[int, int, int]:
    """``(ack offset, ack length, body offset)`` of a DATA or REPLY frame (length 0: no ack)."""
    if not flags & FLAG_ACK:
        return 0, 0, HEADER_SIZE
    if len(data) < HEADER_SIZE + PIGGY.size:
        raise ProtocolError("malformed", "frame flagged with an ack has no room for it")
    (n,) = PIGGY.unpack_from(data, HEADER_SIZE)
    start = HEADER_SIZE + PIGGY.size
    if len(data) < start + n:
        raise ProtocolError("malformed", f"piggybacked ack of {n} bytes overruns the frame")
    return start, n, start + n


def reply_entry(msg_id: bytes, type_name: bytes, body: bytes) -> bytes:
    return REPLY_ENTRY.pack(msg_id, len(type_name)) + type_name + REPLY_LEN.pack(len(body)) + body


def parse_replies(data: bytes, offset: int) -> list[tuple[bytes, str, bytes]]:
    """The ``(msg_id, type, body)`` entries of a REPLY frame, or :class:`ProtocolError`."""
    out = []
    end = len(data)
    view = memoryview(data)
    while offset < end:
        if end - offset < REPLY_ENTRY.size:
            raise ProtocolError("malformed", "truncated reply entry")
        msg_id, tlen = REPLY_ENTRY.unpack_from(data, offset)
        offset += REPLY_ENTRY.size
        if end - offset < tlen + REPLY_LEN.size:
            raise ProtocolError("malformed", "truncated reply entry")
        type_name = bytes(view[offset : offset + tlen]).decode("utf-8", "replace")
        offset += tlen
        (n,) = REPLY_LEN.unpack_from(data, offset)
        offset += REPLY_LEN.size
        if end - offset < n:
            raise ProtocolError("malformed", "reply body overruns the frame")
        out.append((msg_id, type_name, bytes(view[offset : offset + n])))
        offset += n
    return out
