"""Processes for the end-to-end benchmarks: started, waited for with deadlines, always reaped.

A :class:`Procs` holds every child of one measurement (choreo nodes from :mod:`bench.nodes`,
raw pyzmq programs from :mod:`bench.raw`) and a scratch directory for their reports; leaving
its ``with`` block stops the nodes (SIGTERM to all at once: they drain in parallel), kills what
is still running after a few seconds, waits for every child and removes the directory::

    with Procs() as procs:
        consumer = procs.node("bench.nodes:consumer")
        report = procs.run_producer({"count": 100_000, "keys": 1000}, peers=[consumer.endpoint])

Every socket is on 127.0.0.1; every wait has a deadline and fails with the children's stderr.
"""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from choreo.config import NodeConfig
from choreo.launch import NodeProcess
from choreo.trust import Security, create_key

__all__ = [
    "BENCH_CONFIG",
    "SESSION",
    "BenchError",
    "Procs",
    "choreo_run",
    "cpu_seconds",
    "median",
    "percentiles",
    "raw_pingpong",
    "raw_pingpong_under_load",
    "raw_pushpull",
    "rss_kb",
    "scaled",
]

# Defaults, except a faster heartbeat so that nodes leave (drain: two quiet heartbeats) quickly.
BENCH_CONFIG = NodeConfig(heartbeat=0.2, suspect_after=2.0, dead_after=6.0)
ROOT = Path(__file__).resolve().parent.parent
# figures one benchmark leaves for a later one of the same run (the peak rate, for latency under load)
SESSION: dict[str, float] = {}


def scaled(n: int) -> int:
    """``n`` times ``$CHOREO_BENCH_SCALE`` (default 1; e.g. 0.1 for a quick smoke run of the suite)."""
    try:
        factor = float(os.environ.get("CHOREO_BENCH_SCALE", "1"))
    except ValueError:
        factor = 1.0
    return max(1000, int(n * factor))


class BenchError(RuntimeError):
    """A benchmark's process failed or did not report in time."""


class Procs:
    """The children of one measurement (see the module docstring)."""

    def __init__(self) -> None:
        self.nodes: list[NodeProcess] = []
        self.programs: list[subprocess.Popen[bytes]] = []
        self.dir = Path(tempfile.mkdtemp(prefix="choreo-bench-"))
        self._n = 0

    def path(self, name: str) -> str:
        self._n += 1
        return str(self.dir / f"{self._n}-{name}.json")

    # -- choreo nodes ----------------------------------------------------------------------------

    def node(
        self,
        target: str,
        params: dict[str, Any] | None = None,
        *,
        peers: list[str] = (),  # type: ignore[assignment]
        config: NodeConfig = BENCH_CONFIG,
        env: dict[str, str] | None = None,
        security: Security | None = None,
        fsync: str | None = None,
    ) -> NodeProcess:
        """A node process running the service ``module:attribute``, ready when this returns;
        ``fsync``: durable, with a data dir of its own in the scratch directory and that policy."""
        full_env = {"CHOREO_BENCH": json.dumps(params or {}), **(env or {})}
        data_dir = self.dir / f"data-{len(self.nodes) + 1}" if fsync is not None else None
        proc = NodeProcess(target, peers=list(peers), config=config, env=full_env, start=False, security=security,
                           data_dir=data_dir, fsync=fsync or "batch")
        self.nodes.append(proc)
        proc.start(timeout=60)
        return proc

    def report(self, path: str, timeout: float, what: str) -> dict[str, Any]:
        """Wait for the JSON report at ``path`` (BenchError if a node dies or time runs out)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(path):
                with open(path) as f:
                    data: dict[str, Any] = json.load(f)
                if "error" in data:
                    raise BenchError(f"{what} failed: {data['error']}\n{self.stderr()}")
                return data
            for n in self.nodes:
                if not n.alive():
                    raise BenchError(f"{what}: node {n.service} exited ({n.proc.returncode}): {n.stderr()[-3000:]}")
            time.sleep(0.02)
        raise BenchError(f"{what}: no report within {timeout:.0f} s\n{self.stderr()}")

    def produce(
        self,
        params: dict[str, Any],
        peers: list[str],
        *,
        config: NodeConfig = BENCH_CONFIG,
        timeout: float = 120.0,
        security: Security | None = None,
        fsync: str | None = None,
    ) -> dict[str, Any]:
        """Run a producer node with ``params`` (see bench.nodes) and return its report."""
        out = self.path("producer")
        self.node("bench.nodes:producer", {"role": "producer", "out": out, **params}, peers=peers, config=config,
                  security=security, fsync=fsync)
        return self.report(out, timeout, "producer")

    def stderr(self) -> str:
        return "\n".join(f"--- {n.service}: {n.stderr()[-2000:]}" for n in self.nodes if n.stderr().strip())

    # -- raw programs ----------------------------------------------------------------------------

    def program(self, *args: str, module: str = "bench.raw") -> subprocess.Popen[bytes]:
        """``python -m MODULE ARGS`` (bench.raw by default), with stdout piped."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [str(ROOT), *sys.path] if p)}
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        self.programs.append(proc)
        return proc

    @staticmethod
    def line(proc: subprocess.Popen[bytes], timeout: float) -> str:
        """The next line the program prints (BenchError with its stderr if none comes in time)."""
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        buf = b""
        fd = proc.stdout.fileno()
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(fd, 1)
            if not chunk:
                break
            if chunk == b"\n":
                return buf.decode()
            buf += chunk
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise BenchError(f"program {proc.args[2:]} printed no line within {timeout:.0f} s: {err.decode()[-2000:]}")

    # -- cleanup ---------------------------------------------------------------------------------

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        live = [n for n in self.nodes if n.alive()]
        for n in live:  # all at once: they drain in parallel
            try:
                assert n.proc is not None
                n.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        for n in live:
            assert n.proc is not None
            try:
                n.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                n.kill()
        for n in self.nodes:
            n.kill()  # no-op when it is gone; reaps otherwise
            if n.stderr_path:
                try:
                    os.unlink(n.stderr_path)
                except OSError:
                    pass
        for p in self.programs:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=10)
        self.nodes.clear()
        self.programs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


def percentiles(values: list[int], qs: tuple[float, ...] = (50, 99, 99.9)) -> dict[float, float]:
    """Nearest-rank percentiles of ``values``."""
    if not values:
        raise ValueError("no values")
    s = sorted(values)
    return {q: float(s[min(len(s), max(1, math.ceil(q / 100 * len(s)))) - 1]) for q in qs}


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of a live process in KiB (Linux), 0 where unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def raw_pushpull(procs: Procs, count: int, payload: bytes, pack: int = 1, timeout: float = 120.0) -> dict[str, float]:
    """A PUSH process sends ``count`` payloads (``pack`` per message) to a PULL process.

    Returns ``per_s`` (payloads per second at the receiver) and each side's CPU seconds per
    payload (``push_cpu_per``, ``pull_cpu_per``; the whole process, ZeroMQ's I/O thread included).
    """
    count -= count % pack
    pull = procs.program("pull", str(count), str(len(payload)), str(pack))
    endpoint = procs.line(pull, 30)
    path = procs.path("payload")
    with open(path, "wb") as f:
        f.write(payload)
    push = procs.program("push", endpoint, str(count), path, str(pack))
    got = json.loads(procs.line(pull, timeout))
    sent = json.loads(procs.line(push, 30))
    push.wait(30)
    pull.wait(30)
    return {
        "per_s": got["count"] / got["elapsed"],
        "push_cpu_per": sent["cpu_s"] / sent["count"],
        "pull_cpu_per": got["cpu_s"] / max(got["count"], 1),
    }


def raw_pingpong(procs: Procs, count: int, size: int, seconds: float) -> tuple[list[int], dict[str, float]]:
    """Round trips (ns) of ``size`` bytes, DEALER process to ROUTER echo process, and each side's
    CPU seconds per round trip (``client``, ``server``; the echo's include the warm-up's)."""
    echo = procs.program("echo")
    endpoint = procs.line(echo, 30)
    ping = procs.program("ping", endpoint, str(count), str(size), str(seconds))
    result = json.loads(procs.line(ping, seconds + 60))
    echoed = json.loads(procs.line(echo, 30))
    echo.wait(30)
    rtts = list(result["rtt_ns"])
    return rtts, {"client": result["cpu_s"] / len(rtts), "server": echoed["cpu_s"] / max(echoed["echoed"], 1)}


def raw_pingpong_under_load(
    procs: Procs, count: int, size: int, seconds: float, rate: float, payload: bytes
) -> tuple[list[int], float]:
    """Round trips (ns) as :func:`raw_pingpong`, to an echo that also pulls ``payload`` at ``rate``
    a second from a PUSH process (the load outlasts the pings); also the rate carried."""
    echo = procs.program("loaded_echo")
    router, sink = procs.line(echo, 30).split()
    path = procs.path("payload")
    with open(path, "wb") as f:
        f.write(payload)
    push = procs.program("push_at", sink, str(rate), str(seconds + 6), path)
    procs.line(push, 30)  # started
    ping = procs.program("ping", router, str(count), str(size), str(seconds))
    result = json.loads(procs.line(ping, seconds + 60))
    pushed = json.loads(procs.line(push, seconds + 60))
    procs.line(echo, 30)
    echo.wait(30)
    return list(result["rtt_ns"]), pushed["count"] / pushed["elapsed"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process has used so far (Linux), 0.0 where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def choreo_run(
    params: dict[str, Any],
    *,
    consumer_config: NodeConfig = BENCH_CONFIG,
    producer_config: NodeConfig = BENCH_CONFIG,
    services: dict[str, int] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
    secure: bool = False,
    fsync: str | None = None,
) -> dict[str, Any]:
    """One producer node process emitting to fresh consumer node processes; their figures.

    ``services`` maps consumer services of bench.nodes to their instance counts (default one
    ``consumer``). Returns the producer's report plus ``events_per_s``, the consumers' reports
    (``consumers``), their CPU seconds (``consumer_cpu_s``, and each one's: ``consumer_cpu_each``)
    and resident memory (KiB) before and after. ``secure``:
    every node speaks CURVE, with a key of its own from a keys directory made for the run.
    ``fsync``: every node is durable (a data dir of its own) with that fsync policy; the report
    then has each node's ``store`` statistics (``producer_store``, ``consumer_stores``).
    """
    from choreo.client import rpc

    services = services or {"consumer": 1}
    with Procs() as procs:
        keys = procs.dir / "keys"

        def security(name: str, **rights: list[str]) -> Security | None:
            if not secure:
                return None
            create_key(keys, name, **rights)
            return Security.load(keys, name)

        ops = security("ops", admin=["*"])
        nodes: list[tuple[str, NodeProcess]] = []
        for name, count in services.items():
            for _ in range(count):
                seed = [nodes[0][1].endpoint] if nodes else []
                key = security(f"{name}-{len(nodes) + 1}", serves=[name])
                nodes.append((name, procs.node(f"bench.nodes:{name}", peers=seed, config=consumer_config, env=env,
                                               security=key, fsync=fsync)))
        pids = [n.pid for _, n in nodes]
        rss_before = [rss_kb(pid) for pid in pids]
        cpu_before = [cpu_seconds(pid) for pid in pids]
        report = procs.produce({**params, "wait": services}, [nodes[0][1].endpoint], config=producer_config,
                               timeout=timeout, security=security("producer", serves=["producer"], originates=["*"]),
                               fsync=fsync)
        report["consumer_cpu_each"] = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before)]
        report["consumer_cpu_s"] = sum(report["consumer_cpu_each"])
        report["consumers"] = [rpc(n.endpoint, "bench", timeout=10, security=ops) for _, n in nodes]
        if fsync is not None:
            report["consumer_stores"] = [rpc(n.endpoint, "stats", timeout=10, security=ops)["store"] for _, n in nodes]
        report["rss_before_kb"] = rss_before
        report["rss_after_kb"] = [rss_kb(pid) for pid in pids]
    report["events_per_s"] = report["count"] / report["elapsed"]
    return report
