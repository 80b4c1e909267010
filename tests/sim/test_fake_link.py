"""Issue 3: exactly-once processing and per-key order over a link that drops, duplicates and reorders;
and a command's answer, which reaches its caller before the bookkeeping around it (issue 20)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable

import pytest

from choreo import Command, Event, Service, core, wire
from choreo.messages import encode
from choreo.runtime.engine import Engine
from choreo.testing import Harness


class Ping(Event, key="k"):
    k: str
    n: int


class Pong(Event, key="k"):
    k: str
    n: int


class Charge(Command, key="account"):
    account: str
    cents: int


def build(seen: dict[str, list[tuple[str, str, int]]]) -> tuple[Service, Service]:
    relay = Service("relay")

    @relay.on(Ping, emits=[Pong])
    def on_ping(ev: Ping, ctx) -> None:
        seen["relay"].append((ctx.instance, ev.k, ev.n))
        ctx.emit(Pong(k=ev.k, n=ev.n))

    sink = Service("sink")

    @sink.on(Pong)
    async def on_pong(ev: Pong, ctx) -> None:
        seen["sink"].append((ctx.instance, ev.k, ev.n))

    @sink.command(Charge)
    def charge(cmd: Charge, ctx) -> int:
        seen["charge"].append((ctx.instance, cmd.account, cmd.cents))
        return cmd.cents * 2

    return relay, sink


def check(seen: list[tuple[str, str, int]], expected: dict[str, list[int]], what: str, seed: int) -> None:
    per_key: dict[str, list[int]] = defaultdict(list)
    for _instance, key, n in seen:
        per_key[key].append(n)
    assert dict(per_key) == expected, (
        f"{what} (seed {seed}): expected each key's events once and in order; "
        f"differences in keys {[k for k in expected if per_key.get(k) != expected[k]][:5]}"
    )


@pytest.mark.parametrize("seed", range(1, 9))
def test_exactly_once_and_per_key_order_on_a_hostile_link(seed: int) -> None:
    seen: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
    relay, sink = build(seen)
    harness = Harness(seed=seed, drop=0.10, duplicate=0.10, reorder=0.20)
    client = harness.add(None)
    harness.add(relay)
    harness.add(relay)
    harness.add(sink)
    harness.add(sink)

    async def scenario() -> None:
        await harness.start()
        await harness.run_until(lambda: len(client.membership.instances("sink")) == 2, 30, "sink visible")

        async def produce() -> None:
            for n in range(2000):
                await client.emit(Ping(k=f"k{n % 40}", n=n))

        await harness.run(produce(), timeout=600)
        results = await harness.run(asyncio.gather(*(client.send(Charge(account=f"a{i}", cents=i)) for i in range(50))))
        assert results == [i * 2 for i in range(50)], f"seed {seed}"
        total = lambda: len(seen["sink"])  # noqa: E731
        await harness.run_until(lambda: total() >= 2000 and all(ch.idle for ch in client.outbox.out.values()), 600,
                                f"all delivered ({harness.describe()})")
        await harness.advance(5.0)  # late duplicates and retransmissions have time to arrive

    asyncio.run(scenario())
    expected: dict[str, list[int]] = defaultdict(list)
    for n in range(2000):
        expected[f"k{n % 40}"].append(n)
    check(seen["relay"], dict(expected), "relay <- Ping", seed)
    check(seen["sink"], dict(expected), "sink <- Pong", seed)
    assert sorted(c for _, _, c in seen["charge"]) == list(range(50)), f"each command handled once (seed {seed})"
    assert harness.link.dropped > 0 and harness.link.duplicated > 0
    assert {i for i, _, _ in seen["relay"]} == {e.name for e in harness.engines.values() if e.service and e.service.name == "relay"}



def caller_and_owner(seed: int) -> tuple[Harness, Engine, Engine, dict[str, list[tuple[str, str, int]]]]:
    """A client and one ``sink`` instance (it answers ``Charge``) on a clean link."""
    seen: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
    _, sink = build(seen)
    harness = Harness(seed=seed)
    return harness, harness.add(None), harness.add(sink), seen


async def joined(harness: Harness, client: Engine) -> None:
    await harness.start()
    await harness.run_until(lambda: len(client.membership.instances("sink")) == 1, 30, "sink visible")


def rewrite_answers(harness: Harness, owner: Engine, client: Engine, rewrite: Callable[[bytes], bytes]) -> None:
    """Every REPLY frame from ``owner`` to ``client`` goes through ``rewrite`` on the link."""
    transmit = harness.link.transmit

    def through(now: float, src: str, dst: str, frame: bytes) -> None:
        if src == owner.transport.endpoint and dst == client.transport.endpoint:
            if wire.parse_header(frame)[0] == wire.REPLY:
                frame = rewrite(frame)
        transmit(now, src, dst, frame)

    harness.link.transmit = through  # type: ignore[method-assign]


def test_a_reply_frame_says_it_woke_a_caller_and_only_then() -> None:
    """on_frame returns True for the REPLY frame that resolved an awaited call (the transport lets
    that caller run before it reads on), False for every other frame, and for the same answer again."""
    harness, client, _, _ = caller_and_owner(seed=3)
    said: list[tuple[int, bool, bytes, bytes]] = []
    on_frame = client.on_frame

    def recording(data: bytes, identity: bytes | None = None, principal: str | None = None) -> bool:
        woke = on_frame(data, identity, principal)
        said.append((wire.parse_header(data)[0], woke, data, identity or b""))
        return woke

    client.on_frame = recording  # type: ignore[method-assign]

    async def scenario() -> list[int]:
        await joined(harness, client)
        return [await harness.run(client.send(Charge(account=f"a{i}", cents=i))) for i in range(3)]

    assert asyncio.run(scenario()) == [0, 2, 4]
    woke = [(kind, data, src) for kind, w, data, src in said if w]
    assert len(woke) == 3 and all(kind == wire.REPLY for kind, _, _ in woke)

    async def again() -> None:  # the first answer's frame once more: nobody waits for it now
        harness.inject(woke[0][2].decode(), client, woke[0][1])
        await harness.advance(0.1)

    asyncio.run(again())
    assert [w for _, w, data, _ in said if data == woke[0][1]] == [True, False]
    assert client.counters.refused.get("malformed", 0) == 0


def test_a_command_and_its_duplicate_in_one_frame_both_get_its_result() -> None:
    """The owner sends a frame's answers before it keeps their results (its callers wait on the
    answers): a duplicate of a command in the same frame must still find the result kept, and get
    the first answer again, not ResultExpired."""
    harness, client, owner, seen = caller_and_owner(seed=5)
    answers: list[bytes] = []

    def recording(frame: bytes) -> bytes:
        body_at = wire.split_ack(frame, wire.parse_header(frame)[1])[2]
        answers.extend(payload for _, _, payload in wire.parse_replies(frame, body_at))
        return frame

    rewrite_answers(harness, owner, client, recording)

    async def scenario() -> None:
        await joined(harness, client)
        assert await harness.run(client.send(Charge(account="a0", cents=1))) == 2  # the channel's seq 1
        key, msg_id = b"a1", b"d" * 16
        partition = core.partition_of(key, owner.service.partitions)
        body = b"".join(
            core.pack_envelope(seq, wire.KIND_COMMAND, 0, b"Charge", key, partition, msg_id, msg_id, bytes(16),
                               encode(Charge(account="a1", cents=7)))
            for seq in (2, 3)  # the same command twice (its id), as a resend in the same batch would be
        )
        answers.clear()
        harness.inject(client.transport.endpoint, owner,
                       wire.frame(wire.DATA, client.incarnation, owner.incarnation, body, wire.FLAG_URGENT))
        await harness.run_until(lambda: len(answers) >= 2, 10, "both answered")

    asyncio.run(scenario())
    assert answers == [answers[0], answers[0]] and answers[0][:1] == b"\x01", answers
    assert [(account, cents) for _, account, cents in seen["charge"]] == [("a0", 1), ("a1", 7)]  # ran once


def test_an_answer_whose_ack_is_malformed_still_reaches_its_caller_and_the_bad_ack_is_counted() -> None:
    """The ack riding on an answer that woke a caller is applied after that caller ran: a
    malformed one is refused and counted then (never raised), and the command, never acked,
    is sent again until a good ack comes, answered from the owner's dedup without running twice."""
    harness, client, owner, seen = caller_and_owner(seed=7)
    spoiled: list[bytes] = []

    def spoiling(frame: bytes) -> bytes:
        flags = wire.parse_header(frame)[1]
        if spoiled or not flags & wire.FLAG_ACK:
            return frame
        ack_at, ack_len, _ = wire.split_ack(frame, flags)
        spoiled.append(frame[:ack_at] + b"\xff" * ack_len + frame[ack_at + ack_len:])
        return spoiled[-1]

    rewrite_answers(harness, owner, client, spoiling)

    async def scenario() -> int:
        await joined(harness, client)
        result = await harness.run(client.send(Charge(account="a1", cents=21)))
        await harness.run_until(lambda: all(ch.idle for ch in client.outbox.out.values()), 30, "the command acked")
        return result

    assert asyncio.run(scenario()) == 42
    assert spoiled and client.counters.refused["malformed"] == 1
    assert [(account, cents) for _, account, cents in seen["charge"]] == [("a1", 21)]
