"""A fuzz of the whole frame path: every frame type, valid frames mutated, from peers and strangers.

The frames a small mesh really exchanges (hellos, probes, news, syncs, data, acks, answers, refusals,
system queries) are recorded on the fake link, then hypothesis mutates them (bytes flipped,
cut, repeated or appended; header fields replaced) and feeds them to a node, as if from the
peer that sent the original or from a stranger. Whatever arrives, the node never raises, counts
each refusal by a reason that names it (never ``internal_error``: that would be a bug), and still
answers a command afterwards.
"""

from __future__ import annotations

import asyncio
import struct
from collections import Counter

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from choreo import Command, Event, NodeConfig, Query, Service, wire
from choreo.testing import Harness

CONFIG = NodeConfig(suspect_after=1.0, dead_after=3.0, heartbeat=0.25)


class Deposit(Command, key="account"):
    account: str
    cents: int


class Deposited(Event, key="account"):
    account: str
    cents: int


class Balance(Query, key="account"):
    account: str


def bank() -> Service:
    svc = Service("bank", partitions=8)
    balances: dict[str, int] = {}

    @svc.command(Deposit, emits=[Deposited])
    def deposit(cmd: Deposit, ctx) -> int:  # type: ignore[no-untyped-def]
        balances[cmd.account] = balances.get(cmd.account, 0) + cmd.cents
        ctx.emit(Deposited(cmd.account, cmd.cents))
        return balances[cmd.account]

    @svc.on(Deposited)
    def deposited(ev: Deposited) -> None: ...

    @svc.query(Balance)
    def balance(q: Balance) -> int:
        return balances.get(q.account, 0)

    return svc


SEED = 11  # the fuzzed node is the recording's bank again: the frames name incarnations it knows


def _record() -> list[tuple[str, str, bytes]]:
    """(sender, receiver, frame) of every frame the client and the bank exchange in a short run."""
    h = Harness(seed=SEED, config=CONFIG)
    client = h.add(None)
    h.add(bank())
    recorded: list[tuple[str, str, bytes]] = []
    transmit = h.link.transmit

    def tap(now: float, src: str, dst: str, frame: bytes) -> None:
        recorded.append((src, dst, frame))
        transmit(now, src, dst, frame)

    h.link.transmit = tap  # type: ignore[method-assign]

    async def scenario() -> None:
        await h.start()
        for n in range(5):
            await h.run(client.send(Deposit(f"a{n}", n)))
        await h.run(client.ask(Balance("a1")))
        await h.advance(1.0)

    asyncio.run(scenario())
    return recorded


RECORDED = _record()
TYPES = sorted({wire.parse_header(f)[0] for _, _, f in RECORDED})
SELF_FRAME = next(i for i, (src, dst, _) in enumerate(RECORDED) if src == dst)  # the bank's data to itself
REASONS: Counter[str] = Counter()  # what the fuzz made the node refuse, over all examples (for reading)


def test_the_recording_covers_every_frame_type_a_mesh_sends() -> None:
    assert {wire.HELLO, wire.PING, wire.PONG, wire.NEWS, wire.SYNC, wire.DATA, wire.ACK, wire.REPLY} <= set(TYPES)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 20), st.just(0)),
    st.tuples(st.just("append"), st.binary(max_size=64), st.just(0)),
    st.tuples(st.just("header"), st.integers(0, 5), st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("repeat"), st.integers(0, 1 << 20), st.integers(1, 64)),
)


def mutate(frame: bytes, ops: list[tuple[str, object, int]]) -> bytes:
    data = bytearray(frame)
    for op, a, b in ops:
        if op == "flip" and data:
            data[int(a) % len(data)] ^= b  # type: ignore[call-overload]
        elif op == "cut":
            del data[int(a) % (len(data) + 1):]  # type: ignore[call-overload]
        elif op == "append":
            data += a  # type: ignore[operator]
        elif op == "repeat" and data:
            at = int(a) % len(data)  # type: ignore[call-overload]
            data[at:at] = data[at:at + b] * 2
        elif op == "header" and len(data) >= wire.HEADER_SIZE:
            fields = list(struct.unpack_from("<4sBBHQQ", data))
            index = int(a)  # type: ignore[call-overload]
            if index == 0:
                fields[0] = b"CHRO" if b % 2 else b"CHRx"
            elif index in (1, 2):
                fields[index] = b % 256
            elif index == 3:
                fields[3] = b % 65536
            else:
                fields[index] = b
            struct.pack_into("<4sBBHQQ", data, 0, *fields)
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, len(RECORDED) - 1), st.lists(mutation, min_size=1, max_size=4), st.booleans()),
        min_size=1,
        max_size=12,
    )
)
@example([(SELF_FRAME, [("header", 2, wire.BYE)], False)])  # a node's frame to itself made a BYE: it stays
def test_no_frame_breaks_a_node(frames: list[tuple[int, list[tuple[str, object, int]], bool]]) -> None:
    h = Harness(seed=SEED, config=CONFIG)
    client = h.add(None)
    target = h.add(bank())

    async def scenario() -> None:
        await h.start()
        for index, ops, stranger in frames:
            src, dst, frame = RECORDED[index]
            receiver = h.engines[dst]  # the same node as in the recording: same seed, same incarnations
            origin = "inproc://fake/stranger" if stranger else src  # its sender's connection, or somebody else's
            receiver.on_frame(mutate(frame, ops), origin.encode(), None)  # must not raise
        await h.advance(0.5)
        for node in (client, target):
            REASONS.update(node.counters.refused)
            assert node.counters.refused.get("internal_error", 0) == 0, dict(node.counters.refused)
        # a newcomer asks (the recorded frames carry the ids this run's client draws next: same seed)
        newcomer = h.join(None)
        assert await h.run(newcomer.send(Deposit("after", 1)), timeout=30) == 1, "it still serves"

    asyncio.run(scenario())
