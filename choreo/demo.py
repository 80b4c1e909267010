"""`make demo` until the example system lands: the delivery core over a hostile fake link.

A sender window and a receiver (reorder + dedup) exchange batches over a link that drops,
duplicates and reorders frames, seeded so every run is the same. The receiver handles every
message exactly once and in order; the output says what it took.
"""

from __future__ import annotations

import argparse
import random
import sys

from . import core


def run(messages: int = 20_000, drop: float = 0.1, duplicate: float = 0.1, reorder: float = 0.2, seed: int = 7) -> int:
    rng = random.Random(seed)
    sender = core.OutboundWindow(max_messages=512, rto=0.05, rto_max=0.4)
    receiver = core.InboundReorder(window=512)
    dedup = core.DedupWindow(ttl=60.0, max_entries=100_000)
    prefix = rng.randbytes(8)
    link: list[tuple[float, str, bytes]] = []  # (arrival time, direction, frame)
    now, produced, handled, expected = 0.0, 0, 0, 0
    frames_sent = frames_dropped = frames_duplicated = dup_ids = 0
    blank = bytes(16)

    def transmit(direction: str, frame: bytes) -> None:
        nonlocal frames_sent, frames_dropped, frames_duplicated
        frames_sent += 1
        if rng.random() < drop:
            frames_dropped += 1
            return
        copies = 2 if rng.random() < duplicate else 1
        frames_duplicated += copies - 1
        for _ in range(copies):
            delay = 0.001 + (rng.random() * 0.02 if rng.random() < reorder else 0.0)
            link.append((now + delay, direction, frame))

    while handled < messages:
        if now > 600:
            print("demo: gave up after 600 simulated seconds", file=sys.stderr)
            return 1
        # the producer: as much as credit allows, in batches of up to 64
        while produced < messages and sender.has_credit(200) and sender.pending < 64:
            msg_id = prefix + produced.to_bytes(8, "little")
            # every 50th message is sent twice by the application itself (a client retry)
            for _ in range(2 if produced % 50 == 49 else 1):
                if not sender.has_credit(200):
                    break
                sender.append(1, 0, b"Tick", b"key-%d" % (produced % 10), 0, msg_id, blank, blank,
                              produced.to_bytes(4, "little"), now)
            produced += 1
        body = sender.flush()
        if body:
            transmit("data", body)
        again = sender.due(now)
        if again:
            transmit("data", again)
        # deliver what has arrived by now
        link.sort(key=lambda item: item[0])
        while link and link[0][0] <= now:
            _, direction, frame = link.pop(0)
            if direction == "ack":
                sender.on_ack_frame(frame, 0, now)
                continue
            released = receiver.feed(frame)
            fresh = dedup.insert_envelopes(released, now)
            for env, is_new in zip(released, fresh):
                if is_new:
                    value = int.from_bytes(env.payload, "little")
                    if value != expected:
                        print(f"demo: expected message {expected}, got {value}", file=sys.stderr)
                        return 1
                    expected += 1
                    handled += 1
                else:
                    dup_ids += 1
            receiver.complete_many(env.seq for env in released)
            if receiver.ack_pending:
                transmit("ack", receiver.ack_frame())
        now += 0.001

    w, r, d = sender.stats(), receiver.stats(), dedup.stats()
    print(f"choreo core demo ({core.IMPLEMENTATION} core), link: {drop:.0%} drop, {duplicate:.0%} duplicate, "
          f"{reorder:.0%} reorder, seed {seed}")
    print(f"  handled exactly once, in order: {handled:,} messages in {now:.2f} simulated s")
    print(f"  frames sent {frames_sent:,}; dropped by the link {frames_dropped:,}; duplicated {frames_duplicated:,}")
    print(f"  retransmitted envelopes: {w.retransmitted:,}; peak in flight {w.peak_in_flight} of {w.window}")
    print(f"  duplicate arrivals discarded by sequence: {r.duplicates:,}")
    print(f"  application retries recognised by id and not handled again: {dup_ids:,} "
          f"(dedup window holds {d.entries:,} ids)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    return run(messages=args.messages, seed=args.seed)


if __name__ == "__main__":
    sys.exit(main())
