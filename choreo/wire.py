"""The wire format between nodes: one ZeroMQ message is one frame.

Every frame opens with a fixed 24-byte header, then a body whose meaning depends on the type::

    0  4s  magic b"CHRO"      4  u8  version (1)     5  u8  frame type    6  u16 flags
    8  u64 sender incarnation                        16 u64 receiver incarnation (0: any)

``DATA`` bodies are batches of envelopes (layout in ``choreo/_pycore.py``), handled by the
compiled core without a copy. ``ACK`` bodies are the core's ack encoding. ``REPLY`` bodies are
the answers to commands and queries, each ``16s msg_id | u8 type_len | type | u32 len | body``.
A ``DATA`` or ``REPLY`` frame with ``FLAG_ACK`` set starts with ``u16 len | ack``: the sender's
ack of what it received from the receiver rides along instead of taking a frame of its own. A
``DATA`` frame with ``FLAG_URGENT`` holds commands or queries, which the receiver handles at once,
ahead of the events queued there. An ``ACK`` frame with ``FLAG_KEEP`` starts with the seqs of
envelopes whose sender should keep a copy beyond this ack (see :data:`FLAG_KEEP`). Control bodies
(``HELLO``, ``HEARTBEAT``, ``BYE``, ``REFUSE``, ``RPC``, ``RPC_REPLY``, a leaving last
instance's ``FLOWS``, a hand-over's ``RELEASE``, and membership's ``PING``, ``PING_REQ``, ``PONG``, ``NEWS``, ``SYNC``) are
MessagePack decoded into the structs below, so a malformed or hostile body fails validation
instead of reaching the runtime. Nothing here is ever unpickled.

Membership (:mod:`choreo.runtime.gossip`) speaks SWIM: a ``PING`` asks "are you there?", a
``PONG`` answers it, a ``PING_REQ`` asks a third node to ping someone on the sender's behalf;
each of them, and ``NEWS``, carries *rumors* (:data:`Rumor`): a member's record (:class:`Member`),
a declared service (:class:`Declared`), a retirement (:class:`Retired`). ``SYNC`` compares and
exchanges whole membership tables (anti-entropy).

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
before it is decoded (:data:`MAX_CONTROL_BYTES`), a frame carries at most :data:`MAX_RUMORS`
rumors and a SYNC at most :data:`MAX_MEMBERS` members, every endpoint in them must parse, and a
service declares 1..65535 partitions. Each violation is a :class:`ProtocolError` with its reason.
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
    "FLOWS",
    "RELEASE",
    "REPLY",
    "PING",
    "PING_REQ",
    "PONG",
    "NEWS",
    "SYNC",
    "FLAG_ACK",
    "FLAG_URGENT",
    "FRAME_NAMES",
    "Hello",
    "Heartbeat",
    "Member",
    "Declared",
    "Retired",
    "Rumor",
    "Ping",
    "PingReq",
    "Pong",
    "News",
    "Sync",
    "MEMBER_STATES",
    "SYNC_BUCKETS",
    "Bye",
    "Refuse",
    "Rpc",
    "RpcReply",
    "Flows",
    "Release",
    "FLAG_KEEP",
    "split_keep",
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
    "MAX_MEMBERS",
    "endpoint_problem",
    "split_endpoint",
]

MAGIC = b"CHRO"
VERSION = 1
HEADER = struct.Struct("<4sBBHQQ")
HEADER_SIZE = HEADER.size  # 24

DATA, ACK, HELLO, HEARTBEAT, BYE, REFUSE, RPC, RPC_REPLY, REPLY = range(1, 10)
PING, PING_REQ, PONG, NEWS, SYNC = range(10, 15)  # membership (SWIM): see the module docstring
FLOWS = 15  # "I leave last of my service: what of these flows waits for it, send me" (see Flows)
RELEASE = 16  # "the copies you kept for me of these (FLAG_KEEP) may go": see Release
FRAME_NAMES = {
    PING: "ping",
    PING_REQ: "ping_req",
    PONG: "pong",
    NEWS: "news",
    SYNC: "sync",
    REPLY: "reply",
    DATA: "data",
    ACK: "ack",
    HELLO: "hello",
    HEARTBEAT: "heartbeat",
    BYE: "bye",
    REFUSE: "refuse",
    RPC: "rpc",
    RPC_REPLY: "rpc_reply",
    FLOWS: "flows",
    RELEASE: "release",
}

# frame flags
FLAG_ACK = 0x0001  # the body starts with a piggybacked ack (u16 length, then the ack)
# a DATA body that holds commands or queries: the receiver takes those ahead of the events queued
# there (a receiver that does not know the flag handles the frame in order, as before)
FLAG_URGENT = 0x0002
# an ACK frame whose body starts with ``u16 n | n x u64 seq``: envelopes of the channel it acks
# that the receiver acknowledges before they are done (it handed them over running with their
# partition, or relieved a channel they held); the sender keeps a copy of each beyond the ack, to
# send again to the partition's owner should the receiver go before it says RELEASE. Every ACK
# frame of the channel lists them until then (one that covers a seq unlisted releases it too), so
# the ack that frees an envelope always asks for its copy
FLAG_KEEP = 0x0004
KEEP_COUNT = struct.Struct("<H")
KEEP_SEQ = struct.Struct("<Q")
# a seq to keep with this bit set: that envelope ran at the receiver (or one with its id did, and
# it waits for that one), so the receiver's next life has its id; one without it may still wait
# there (relief.py), unknown to a next life (see Router.send_again)
KEEP_RAN = 1 << 63
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
FLAG_REPLAY = core.FLAG_REPLAY  # a dead letter replayed on purpose: bypasses dedup once


# ---------------------------------------------------------------------------------------- endpoints

MAX_MEMBERS = 1 << 16  # member records in one SYNC: a mesh of up to this many nodes
MAX_RUMORS = 256  # rumors piggybacked on one membership frame
SYNC_BUCKETS = 64  # anti-entropy compares tables as this many digests (members by incarnation % 64)


def _check_endpoint(what: str, endpoint: str) -> None:
    problem = endpoint_problem(endpoint)
    if problem is not None:
        raise ProtocolError("bad_endpoint", f"{what}: {problem}")


def _check_members(what: str, members: list[Any]) -> None:
    for i, m in enumerate(members):
        if isinstance(m, Member):
            _check_endpoint(f"{what}: member {i}", m.endpoint)


# ---------------------------------------------------------------------------------------- control bodies

_Endpoint = Annotated[str, Meta(max_length=MAX_ENDPOINT)]
_Incarnation = Annotated[int, Meta(ge=0)]  # a u64 (msgpack rejects larger)
_Name = Annotated[str, Meta(max_length=200)]


_Version = Annotated[int, Meta(ge=0, le=(1 << 32) - 1)]
# (partition, epoch) of the partitions a node read back and has yet to settle (see Ownership's epochs)
_Restored = Annotated[
    list[tuple[Annotated[int, Meta(ge=0, le=65535)], Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]]],
    Meta(max_length=65536),
]

#: a member's state as gossip carries it (index = code on the wire)
MEMBER_STATES = ("alive", "suspect", "leaving", "dead", "left")


class Member(msgspec.Struct, array_like=True, frozen=True, tag=0):
    """One node's record, as gossip spreads it: who it is, where, what it serves, what state it is in.

    ``version`` is the member's own counter (the "incarnation number" of the SWIM paper; choreo's
    incarnation is the node-life id): the member raises it to refute a suspicion and whenever its
    own record changes (it starts leaving), and a record replaces a known one of the same
    incarnation only with a higher version (or, for "suspect", "dead" and "left", an equal one).
    ``state`` is an index into :data:`MEMBER_STATES`.
    """

    incarnation: _Incarnation
    version: _Version
    state: Annotated[int, Meta(ge=0, le=len(MEMBER_STATES) - 1)]
    endpoint: _Endpoint
    node: _Name
    service: _Name | None = None
    window: Annotated[int, Meta(ge=1, le=1 << 20)] = 1
    max_message_bytes: Annotated[int, Meta(ge=1)] = 1
    # its rendezvous key when it is not its incarnation (a durable node's, see Hello.key)
    key: Annotated[bytes, Meta(max_length=32)] = b""


class Declared(msgspec.Struct, array_like=True, frozen=True, tag=1):
    """A service the mesh declares (the declared system spreads as these)."""

    spec: ServiceSpec


class Retired(msgspec.Struct, array_like=True, frozen=True, tag=2):
    """An operator retired a service: gossip must never bring it back."""

    service: _Name


#: what membership frames carry besides their own fields
Rumor = Member | Declared | Retired
_Rumors = Annotated[list[Rumor], Meta(max_length=MAX_RUMORS)]


class Ping(msgspec.Struct, array_like=True, omit_defaults=True, frozen=True):
    """SWIM's probe: answer with a :class:`Pong` of the same ``seq``.

    ``source``: the sender's own record, for a receiver that may not know it yet (a newcomer).
    """

    seq: _Version
    source: Member | None = None
    rumors: _Rumors = []


class PingReq(msgspec.Struct, array_like=True, omit_defaults=True, frozen=True):
    """Ping ``target`` for me and pass its pong on with my ``seq`` (SWIM's indirect probe)."""

    seq: _Version
    target: Member
    rumors: _Rumors = []


class Pong(msgspec.Struct, array_like=True, omit_defaults=True, frozen=True):
    """The answer to a :class:`Ping` (from its target, or relayed by the node a :class:`PingReq` asked)."""

    seq: _Version
    rumors: _Rumors = []


class News(msgspec.Struct, array_like=True, omit_defaults=True, frozen=True):
    """Rumors alone: what a node spreads to a few random members while it has news."""

    rumors: _Rumors = []


class Sync(msgspec.Struct, array_like=True, omit_defaults=True, frozen=True):
    """Anti-entropy: two nodes compare their tables and send each other what differs.

    ``buckets``: the sender's 32-bit digests (:data:`SYNC_BUCKETS` of them, members by incarnation),
    ``system`` a digest of its declared system. The answer carries the records of the buckets
    that differ (``members``, tombstones included) and asks for the asker's (``want``); with
    ``full``, ``members`` is the whole table (what a joining node gets from its seed). ``services``
    and ``retired`` carry the declared system when the digests say it differs.
    """

    buckets: Annotated[list[Annotated[int, Meta(ge=0, lt=1 << 32)]], Meta(max_length=SYNC_BUCKETS)] = []
    system: int = 0
    members: Annotated[list[Member], Meta(max_length=MAX_MEMBERS)] = []
    services: Annotated[list[ServiceSpec], Meta(max_length=MAX_MEMBERS)] = []
    retired: Annotated[list[_Name], Meta(max_length=MAX_MEMBERS)] = []
    want: Annotated[list[Annotated[int, Meta(ge=0, lt=SYNC_BUCKETS)]], Meta(max_length=SYNC_BUCKETS)] = []
    full: bool = False
    reply: bool = False


class Hello(msgspec.Struct, frozen=True):
    """A node introduces itself (to its seeds, to the instances of its own service while it
    joins, to a member whose declarations it lacks) and answers a hello that asks for one.

    ``services``: the declared services the sender knows that have no live instance it knows
    of (the others a newcomer learns from their instances); ``retired``: services an operator
    retired, which gossip must not bring back; ``sync``: the sender (joining) asks for the
    receiver's whole membership table (a full :class:`Sync`) along with the answer.
    """

    node: _Name
    incarnation: _Incarnation
    endpoint: _Endpoint
    service: ServiceSpec | None
    window: Annotated[int, Meta(ge=1, le=1 << 20)]
    max_message_bytes: Annotated[int, Meta(ge=1)]
    reply: bool = False
    leaving: bool = False
    holding: bytes = b""  # the partitions the sender owns or drains (a bitmap): a newcomer waits for their handover
    services: list[ServiceSpec] = []
    retired: list[str] = []
    # the sender's rendezvous key when it is not its incarnation: a durable node's, derived from its
    # persisted name, so that its next life owns the same partitions (empty: the incarnation)
    key: Annotated[bytes, Meta(max_length=32)] = b""
    sync: bool = False
    version: _Version = 0  # the sender's own record version (see Member)
    # the partitions the sender keeps a standby copy of (a bitmap, ``replicas=1``): when their owner
    # is gone and nobody holds them, a newcomer that wins one waits for the copy rather than start empty
    copies: bytes = b""
    # of the partitions it holds, those it read back (its store, or a standby copy whose owner is
    # gone) and has yet to settle, with their epochs: of two such copies the newer wins
    restored: _Restored = []


class Heartbeat(msgspec.Struct, frozen=True):
    """Direct word to a partner, not to the whole mesh: to the peers a node has messages in flight
    to, and to the other instances of its service when its partitions change.

    ``ack_please``: the sender still waits for acks from the receiver; the receiver answers
    with its current ack, so a lost final ack costs one heartbeat, never a stalled channel.
    ``holding``: the partitions the sender owns or drains (a bitmap); ``copies``: those it keeps a
    standby copy of; ``restored``: those it read back, with their epochs (see :class:`Hello`).
    """

    leaving: bool = False
    ack_please: bool = False
    holding: bytes = b""
    retired: list[str] = []
    copies: bytes = b""
    restored: _Restored = []


class Bye(msgspec.Struct, frozen=True):
    """The sender leaves the mesh on purpose (graceful stop)."""

    reason: str = "stopping"


class Flows(msgspec.Struct, frozen=True):
    """From the last instance of ``service``, while it leaves: the flows (trace ids) of the
    messages it still has in progress or unacknowledged downstream. Peers send it what of those flows waits for ``service``
    (a flow that comes back, A -> B -> A, would otherwise wait for an instance that the leaver's
    drain waits for); anything else for ``service`` keeps waiting for the next instance. Said
    again every ``rto`` while it drains; an empty list: nothing more.
    """

    service: str
    traces: list[bytes]


_MsgId = Annotated[bytes, Meta(min_length=16, max_length=16)]


class Release(msgspec.Struct, frozen=True):
    """From a receiver to the sender of a channel: the messages ``ids``, which it acknowledged
    before their outputs were acknowledged and asked the sender to keep a copy of (an ACK frame
    with :data:`FLAG_KEEP`), have their outputs acknowledged now: the copies may go."""

    ids: list[_MsgId]


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
    PING: Ping,
    PING_REQ: PingReq,
    PONG: Pong,
    NEWS: News,
    SYNC: Sync,
    HELLO: Hello,
    HEARTBEAT: Heartbeat,
    BYE: Bye,
    REFUSE: Refuse,
    RPC: Rpc,
    RPC_REPLY: RpcReply,
    FLOWS: Flows,
    RELEASE: Release,
}
_encoder = msgspec.msgpack.Encoder()
_decoders = {t: msgspec.msgpack.Decoder(cls) for t, cls in _CONTROL_TYPES.items()}

#: The largest body of each control frame, refused before decoding. A hello carries the
#: sender's whole service declaration (message types with their JSON schemas); rumors may
#: carry one too; a full SYNC carries a whole membership table and the declared system.
MAX_CONTROL_BYTES = {
    PING: 1 << 20,
    PING_REQ: 1 << 20,
    PONG: 1 << 20,
    NEWS: 1 << 20,
    SYNC: 64 << 20,
    HELLO: 512 << 10,
    HEARTBEAT: 256 << 10,
    BYE: 4 << 10,
    FLOWS: 1 << 20,
    RELEASE: 64 << 10,
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
        _check_endpoint(f"hello from {body.node}", body.endpoint)
    elif frame_type in _RUMORS_IN:
        name = FRAME_NAMES[frame_type]
        _check_members(name, body.rumors)
        if frame_type == PING and body.source is not None:
            _check_endpoint(f"{name}: source", body.source.endpoint)
        elif frame_type == PING_REQ:
            _check_endpoint(f"{name}: target", body.target.endpoint)
    elif frame_type == SYNC:
        _check_members("sync", body.members)
    return body


_RUMORS_IN = frozenset({PING, PING_REQ, PONG, NEWS})


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


def keep_prefix(seqs: list[int], ran: set[int] | frozenset[int] = frozenset()) -> bytes:
    """The start of an ACK body flagged :data:`FLAG_KEEP`: the seqs to keep (at most 65,535),
    those in ``ran`` marked :data:`KEEP_RAN`."""
    return KEEP_COUNT.pack(len(seqs)) + b"".join([KEEP_SEQ.pack(s | KEEP_RAN if s in ran else s) for s in seqs])


def split_keep(data: bytes) -> tuple[list[int], list[int], int]:
    """``(seqs to keep, those of them that ran there, ack offset)`` of an ACK frame flagged
    :data:`FLAG_KEEP`."""
    if len(data) < HEADER_SIZE + KEEP_COUNT.size:
        raise ProtocolError("malformed", "ack flagged with copies to keep has no room for them")
    (n,) = KEEP_COUNT.unpack_from(data, HEADER_SIZE)
    start = HEADER_SIZE + KEEP_COUNT.size
    end = start + n * KEEP_SEQ.size
    if len(data) < end:
        raise ProtocolError("malformed", f"{n} seqs to keep overrun the ack frame")
    raw = [s for (s,) in KEEP_SEQ.iter_unpack(data[start:end])]
    return [s & ~KEEP_RAN for s in raw], [s & ~KEEP_RAN for s in raw if s & KEEP_RAN], end


def reply_entry(msg_id: bytes, type_name: bytes, body: bytes) -> bytes:
    return REPLY_ENTRY.pack(msg_id, len(type_name)) + type_name + REPLY_LEN.pack(len(body)) + body


def parse_replies(data: bytes, offset: int) -> list[tuple[bytes, str, bytes]]:
    """The ``(msg_id, type, body)`` entries of a REPLY frame, or :class:`ProtocolError`."""
    try:
        return core.decode_replies(data, offset)  # type: ignore[no-any-return]
    except core.MalformedFrame as exc:
        raise ProtocolError("malformed", str(exc)) from None
