"""Where a command's round trip spends its wall-clock time, stage by stage, in real processes.

``python -m bench.timeline`` runs the latency benchmark's two node processes (``pinger`` sends
``Echo`` commands one after another to ``consumer``), with the runtime's few methods on the
round trip's path wrapped to note when they start and end (``time.perf_counter_ns``, the same
clock in every process on a machine): the request, the transport's sends, each read of the
ROUTER socket and the engine's handling of each frame. Each round trip is then cut at those
marks::

    request  the caller's request, up to its frame's send (encode, route, window, flush)
    send     the caller's zmq_send of that frame
    wire     from the end of that send to the owner's read starting: both ZeroMQ I/O threads,
             TCP over loopback, the owner's wake-up and its event loop's turn
    owner    the owner's read, up to its answer's send (intake, dedup, handler, reply)
    send     the owner's zmq_send of the answer
    wire     back, to the caller's read starting
    read     the caller's read of the answer, until the frame's handling starts
    reply    the caller's handling of the answer frame (on_frame: the future resolved, the ack)
    after    the rest of that read: next to nothing, as a read stops after a frame that woke
             a caller (it goes on, with its flush, once the caller ran); on a runtime before
             that, the look at the socket that ends the read, the flush and the tick's reckoning
    resume   from there until the awaiting coroutine has its result (a turn of the loop)

and the raw pyzmq ping-pong of the same 100 bytes runs beside it for scale. The wrappers cost
about 0.2 µs each; the marks are an instrument for comparing two builds of the runtime, stage
against stage, on the same machine, not a figure for the README's tables.

``python -m bench.timeline --pings 6000 --rounds 3`` (the defaults).
"""

from __future__ import annotations

import argparse
import atexit
import bisect
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

# the marks: (kind, start ns, end ns, extra), four int64 each in one array (no objects for the GC)
_READ, _SEND, _REQUEST, _FRAME = 1, 2, 3, 4
STAGES = ["request", "send", "wire", "owner", "owner send", "wire back", "read", "reply", "after", "resume"]


def install(path: str) -> None:
    """Wrap the round trip's methods in this process to note their times; written to ``path`` at exit.

    (Called by :mod:`bench.nodes` at import when its parameters name a ``timeline``: before the
    node is built, so every bound method the runtime keeps is a wrapped one.)
    """
    from choreo import transport
    from choreo.runtime import calls, engine

    marks = array("q")
    note = marks.extend
    ns = time.perf_counter_ns

    read = transport.ZmqTransport._readable
    send = transport.ZmqTransport.send
    on_frame = engine.Engine.on_frame
    request = calls.Calls.request

    def _readable(self: Any) -> None:
        t = ns()
        read(self)
        note((_READ, t, ns(), 0))

    def _send(self: Any, endpoint: str, frame: bytes) -> None:
        t = ns()
        send(self, endpoint, frame)
        note((_SEND, t, ns(), len(frame)))

    def _on_frame(self: Any, data: bytes, identity: bytes | None = None, principal: str | None = None) -> Any:
        t = ns()
        woke = on_frame(self, data, identity, principal)  # (the reader reads what it returns)
        note((_FRAME, t, ns(), data[5] if len(data) > 5 else 0))
        return woke

    async def _request(self: Any, *args: Any, **kwargs: Any) -> Any:
        t = ns()
        result = await request(self, *args, **kwargs)
        note((_REQUEST, t, ns(), 0))
        return result

    transport.ZmqTransport._readable = _readable  # type: ignore[method-assign]
    transport.ZmqTransport.send = _send  # type: ignore[method-assign]
    engine.Engine.on_frame = _on_frame  # type: ignore[method-assign]
    calls.Calls.request = _request  # type: ignore[method-assign]

    def dump() -> None:
        with open(path, "wb") as f:
            marks.tofile(f)

    atexit.register(dump)


def _load(path: Path) -> dict[int, list[tuple[int, int, int]]]:
    marks = array("q")
    marks.frombytes(path.read_bytes())
    by_kind: dict[int, list[tuple[int, int, int]]] = {}
    for i in range(0, len(marks) - 3, 4):
        by_kind.setdefault(marks[i], []).append((marks[i + 1], marks[i + 2], marks[i + 3]))
    for kind in by_kind.values():
        kind.sort()
    return by_kind


class _Marks:
    """One process's marks of one kind, found by time."""

    def __init__(self, marks: list[tuple[int, int, int]]) -> None:
        self.marks = marks
        self.starts = [m[0] for m in marks]

    def first_from(self, t: int) -> tuple[int, int, int] | None:
        i = bisect.bisect_left(self.starts, t)
        return self.marks[i] if i < len(self.marks) else None


def stages(caller: dict[int, list[tuple[int, int, int]]], owner: dict[int, list[tuple[int, int, int]]],
           skip: int) -> list[list[int]]:
    """Each round trip's stages in ns (see the module docstring), after the first ``skip`` requests.

    A round trip whose marks do not nest as one request's should (a tick's frame, a gossip
    message or a retransmission in between) is left out, and counted by the caller of this.
    """
    c_send, c_read, c_frame = (_Marks(caller.get(k, [])) for k in (_SEND, _READ, _FRAME))
    o_send, o_read = _Marks(owner.get(_SEND, [])), _Marks(owner.get(_READ, []))
    rows = []
    for start, end, _ in caller.get(_REQUEST, [])[skip:]:
        sent = c_send.first_from(start)
        read = o_read.first_from(sent[0]) if sent else None
        answered = o_send.first_from(read[0]) if read else None
        back = c_read.first_from(answered[0]) if answered else None
        frame = c_frame.first_from(back[0]) if back else None
        if not (sent and read and answered and back and frame):
            continue
        if not (start <= sent[0] < sent[1] <= read[0] <= answered[0] <= answered[1] and answered[0] <= read[1]
                and answered[1] <= back[0] <= frame[0] <= frame[1] <= back[1] <= end):
            continue
        rows.append([
            sent[0] - start, sent[1] - sent[0], read[0] - sent[1], answered[0] - read[0], answered[1] - answered[0],
            back[0] - answered[1], frame[0] - back[0], frame[1] - frame[0], back[1] - frame[1], end - back[1],
        ])
    return rows


def _run_round(pings: int, directory: Path) -> tuple[list[list[int]], int, list[int]]:
    from bench.harness import Procs, raw_pingpong

    with Procs() as procs:
        raw, _ = raw_pingpong(procs, pings, 100, 30.0)
    for old in directory.glob("*.bin"):
        old.unlink()
    with Procs() as procs:
        consumer = procs.node("bench.nodes:consumer", {"timeline": str(directory / "owner.bin")})
        out = procs.path("pinger")
        procs.node("bench.nodes:pinger", {"role": "pinger", "out": out, "count": pings, "seconds": 30.0,
                                          "timeline": str(directory / "caller.bin")}, peers=[consumer.endpoint])
        report = procs.report(out, 120, "pinger")
    # (leaving the block stopped both nodes: each wrote its marks as it exited)
    caller, owner = _load(directory / "caller.bin"), _load(directory / "owner.bin")
    rows = stages(caller, owner, skip=len(caller.get(_REQUEST, [])) - len(report["rtt_ns"]))
    return rows, len(report["rtt_ns"]), raw


def _p(values: list[int], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] / 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.timeline", description=__doc__.split("\n")[0])
    parser.add_argument("--pings", type=int, default=6000, help="timed round trips per round (after 500 warm-up)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the marks go (a temporary directory by default)")
    args = parser.parse_args(argv)
    directory = Path(args.dir or tempfile.mkdtemp(prefix="choreo-timeline-"))
    directory.mkdir(parents=True, exist_ok=True)
    print(f"{'round':>5} {'kept':>11} {'raw p50':>8} {'total':>6} " + " ".join(f"{s:>10}" for s in STAGES))
    for n in range(1, args.rounds + 1):
        rows, timed, raw = _run_round(args.pings, directory)
        if not rows:
            print(f"{n:>5} no round trip could be cut into stages")
            continue
        total = [sum(r) for r in rows]
        medians = [_p([r[i] for r in rows], 0.5) for i in range(len(STAGES))]
        print(f"{n:>5} {len(rows):>5}/{timed:<5} {_p(raw, 0.5):8.1f} {_p(total, 0.5):6.1f} "
              + " ".join(f"{m:10.1f}" for m in medians))
    print("µs, medians per stage (they need not add up to the median total); see python -m bench.timeline --help")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
