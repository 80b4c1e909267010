"""Issue 6: follow one flow across services, see lag and dead letters, scrape metrics.

Every service runs in its own node process on 127.0.0.1 (the ``procs`` fixture reaps them);
the test drives them from an in-process client node and reads them only through the CLI
(``choreo trace/top/dlq``, called in this process) and the metrics port, as an operator would.
Every wait polls a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from choreo import NodeConfig
from choreo.cli import main
from choreo.client import rpc
from choreo.node import Node
from choreo.tracing import new_traceparent, span_id, trace_id_of

from .observed import Deposit, Job, PlaceOrder, ledger, lagging, orders, payments, shipping
from .recording import read_records

pytestmark = pytest.mark.slow

FAST = NodeConfig(heartbeat=0.1, suspect_after=1.0, dead_after=3.0)
ZERO = "0" * 32


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``choreo ARGS`` in this process; (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def poll(what: str, fn: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1) -> Any:
    """Call ``fn`` until it returns something truthy; fail naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout:.0f} s; last: {last!r}")


def records(procs, service: str) -> list[str]:  # type: ignore[no-untyped-def]
    out = []
    for name in sorted(os.listdir(procs.record_dir)):
        if name.startswith(service + "-"):
            out += Path(procs.record_dir, name).read_text().splitlines()
    return out


def wait_mesh(peer: str, services: dict[str, int], timeout: float = 20.0) -> None:
    def ready() -> bool:
        have: dict[str, int] = {}
        for p in rpc(peer, "peers"):
            if p["state"] == "alive" and p["service"]:
                have[p["service"]] = have.get(p["service"], 0) + 1
        return all(have.get(s, 0) >= n for s, n in services.items())

    poll(f"mesh with {services}", ready, timeout)


# ---- choreo trace ------------------------------------------------------------------------------


def test_trace_shows_three_steps_with_timings_and_marks_the_failing_one(procs, capsys) -> None:  # type: ignore[no-untyped-def]
    seed = procs.start(orders, config=FAST)
    procs.start(payments, peers=[seed.endpoint], config=FAST)
    procs.start(shipping, peers=[seed.endpoint], config=FAST)
    traceparent = new_traceparent()
    trace_id = trace_id_of(traceparent)

    async def place() -> None:
        async with Node(None, peers=[seed.endpoint], config=FAST) as client:
            await client.wait_for({"orders": 1, "payments": 1, "shipping": 1}, timeout=20)
            assert await client.send(PlaceOrder(order_id="o-1"), traceparent=traceparent) == "o-1"

    asyncio.run(asyncio.wait_for(place(), 60))

    def failed_trace() -> dict[str, Any] | None:
        code, out, err = cli(capsys, "trace", trace_id, "--peer", seed.endpoint, "--json")
        if code == 2:
            return None  # not every span is there yet
        doc = json.loads(out)
        done = doc["status"] == "error" and len(doc["steps"]) == 3
        return doc if done and code == 1 else None

    doc = poll("the flow's third step failed for good", failed_trace, 30)
    # -- the JSON document, field by field
    assert doc["format"] == "choreo-trace/1"
    assert doc["trace_id"] == trace_id
    assert doc["status"] == "error"
    assert doc["services"] == ["orders", "payments", "shipping"]
    assert doc["roots"] == [0]
    assert doc["critical_path"] == [0, 1, 2]
    assert doc["failures"] == [2]
    assert doc["nodes"]["unreachable"] == []
    assert {n.split("#")[0] for n in doc["nodes"]["answered"]} >= {"orders", "payments", "shipping"}
    place_step, payment_step, ship_step = doc["steps"]
    expected = [
        # type, kind, service, handler, key, parent, children, depth
        (place_step, "PlaceOrder", "command", "orders", "place_order", "", None, [1], 0),
        (payment_step, "OrderPlaced", "event", "payments", "take_payment", "o-1", 0, [2], 1),
        (ship_step, "PaymentTaken", "event", "shipping", "ship", "o-1", 1, [], 2),
    ]
    for i, (step, mtype, kind, service, handler, key, parent, children, depth) in enumerate(expected):
        assert step["index"] == i
        assert (step["type"], step["kind"], step["service"], step["handler"]) == (mtype, kind, service, handler)
        assert step["instance"].startswith(service + "#")
        assert (step["key"], step["parent"], step["children"], step["depth"]) == (key, parent, children, depth)
        assert step["critical"] is True
        assert step["cause_missing"] is False
        assert len(step["msg_id"]) == 32
        # timings: received <= started <= finished, and the derived figures agree with them
        assert 0 < step["received"] <= step["started"] <= step["finished"]
        assert step["offset_ms"] == pytest.approx((step["received"] - doc["started"]) * 1000, abs=0.01)
        assert step["queue_ms"] == pytest.approx((step["started"] - step["received"]) * 1000, abs=0.01)
        assert step["duration_ms"] == pytest.approx((step["finished"] - step["received"]) * 1000, abs=0.01)
        assert step["handler_ms"] >= 0
    # causes chain the steps: the first came from outside
    assert place_step["cause_id"] == ZERO and place_step["transit_ms"] is None
    assert payment_step["cause_id"] == place_step["msg_id"]
    assert ship_step["cause_id"] == payment_step["msg_id"]
    assert payment_step["transit_ms"] is not None and ship_step["transit_ms"] is not None
    # the flow runs in causal order, and payments' 20 ms of work shows in its handler time
    assert place_step["received"] <= payment_step["received"] <= ship_step["received"]
    assert payment_step["handler_ms"] >= 19.0
    assert doc["duration_ms"] >= payment_step["handler_ms"]
    assert doc["started"] == place_step["received"] and doc["finished"] == ship_step["finished"]
    # the first two succeeded at once; the last failed twice (one retry) with its error
    for step in (place_step, payment_step):
        assert (step["outcome"], step["error"], step["failed"], step["attempts"]) == ("ok", None, False, 1)
        assert [a["outcome"] for a in step["attempt_log"]] == ["ok"]
    assert ship_step["outcome"] == "error" and ship_step["failed"] is True
    assert ship_step["error"] == "RuntimeError: no courier for o-1"
    assert ship_step["attempts"] == 2
    assert [(a["attempt"], a["outcome"], a["error"]) for a in ship_step["attempt_log"]] == [
        (1, "error", "RuntimeError: no courier for o-1"),
        (2, "error", "RuntimeError: no courier for o-1"),
    ]
    assert ship_step["attempt_log"][0]["finished"] <= ship_step["attempt_log"][1]["started"]

    # -- the handler saw the W3C traceparent of its own handling, in the caller's trace
    lines = records(procs, "shipping")
    assert [line.split()[:2] for line in lines] == [["attempt", "1"], ["attempt", "2"]]
    tp = lines[0].split()[2]
    assert tp == f"00-{trace_id}-{span_id(bytes.fromhex(ship_step['msg_id']), 'ship').hex()}-01"

    # -- the text view: three steps with timings, the failing one marked with its error
    code, out, _ = cli(capsys, "trace", traceparent, "--peer", seed.endpoint, "--color", "never")
    assert code == 1, out
    lines = out.splitlines()
    assert lines[0].startswith(f"trace {trace_id}: error, 3 steps, 3 services, ")
    assert lines[1] == (
        f"  ✗ failed: PaymentTaken in shipping.ship on {ship_step['instance']} after 2 attempts: "
        "RuntimeError: no courier for o-1"
    )
    table = lines[lines.index("       AT    QUEUE  HANDLER     TOOK  STEP") + 1 :][:3]
    assert "★ PlaceOrder -> orders.place_order" in table[0] and table[0].lstrip().startswith("+0.0ms")
    assert "└─ ★ OrderPlaced -> payments.take_payment" in table[1]
    assert "└─ ★ PaymentTaken -> shipping.ship" in table[2]
    assert table[2].endswith("2 attempts ✗ RuntimeError: no courier for o-1")
    for row in table:
        assert row.split()[0].startswith("+") and all(cell.endswith("ms") or cell.endswith("s") for cell in row.split()[:4])
    assert "★ critical path: orders.place_order -> payments.take_payment -> shipping.ship" in out

    # -- a trace nobody knows is an error that says why
    code, _, err = cli(capsys, "trace", "ab" * 16, "--peer", seed.endpoint)
    assert code == 2 and "no node of the mesh (" in err and "remembers trace abab" in err


def test_traces_lists_recent_flows_with_their_ids_and_filters_them(procs, capsys) -> None:  # type: ignore[no-untyped-def]
    seed = procs.start(orders, config=FAST)
    procs.start(payments, peers=[seed.endpoint], config=FAST)
    procs.start(shipping, peers=[seed.endpoint], config=FAST)
    procs.start(ledger, peers=[seed.endpoint], config=FAST, env={"CHOREO_FIX_FLAG": "/nonexistent"})
    placed = [trace_id_of(new_traceparent()) for _ in range(2)]

    async def traffic() -> list[str]:
        async with Node(None, peers=[seed.endpoint], config=FAST) as client:
            await client.wait_for({"orders": 1, "payments": 1, "shipping": 1, "ledger": 1}, timeout=20)
            for i, trace in enumerate(placed):
                await client.send(PlaceOrder(order_id=f"o-{i}"), traceparent=f"00-{trace}-{'1' * 16}-01")
            # an event from outside: its trace id is the message id emit returns
            ids = [(await client.emit(Deposit(account=f"acc-{c}", cents=c))).hex() for c in (1, 13)]
            await client.flush(timeout=20)
            return ids

    good, poison = asyncio.run(asyncio.wait_for(traffic(), 60))

    def listed(*args: str) -> dict[str, dict[str, Any]]:
        code, out, err = cli(capsys, "traces", "--peer", seed.endpoint, "--json", *args)
        assert code == 0, err
        doc = json.loads(out)
        assert doc["format"] == "choreo-traces/1" and doc["nodes"]["unreachable"] == []
        return {t["trace_id"]: t for t in doc["traces"]}

    def settled() -> dict[str, dict[str, Any]] | None:
        flows = listed()
        want = [*placed, good, poison]
        if not all(t in flows for t in want) or any(flows[t]["status"] == "running" for t in want):
            return None
        return flows if flows[placed[0]]["steps"] == 3 and flows[poison]["status"] == "error" else None

    flows = poll("all four flows listed and settled", settled, 30)
    first = flows[placed[0]]
    assert first["status"] == "error" and first["steps"] == 3
    assert first["entry"] == {"type": "PlaceOrder", "handler": "place_order", "service": "orders"}
    assert first["services"] == ["orders", "payments", "shipping"]
    assert first["types"] == ["OrderPlaced", "PaymentTaken", "PlaceOrder"]
    assert [(f["service"], f["handler"], f["error"]) for f in first["failed"]] == [
        ("shipping", "ship", "RuntimeError: no courier for o-0")
    ]
    assert first["duration_ms"] == pytest.approx((first["finished"] - first["started"]) * 1000, abs=0.01)
    assert first["duration_ms"] >= 20, "payments works 20 ms inside this flow"
    assert flows[good]["status"] == "ok" and flows[good]["entry"]["type"] == "Deposit" and flows[good]["keys"] == ["acc-1"]
    assert flows[poison]["status"] == "error" and flows[poison]["failed"][0]["error"] == "ValueError: cannot book 13 cents on acc-13"
    # newest first
    assert list(listed()).index(placed[1]) < list(listed()).index(placed[0])

    # the filters
    assert set(listed("--failed")) == {*placed, poison}
    assert set(listed("--type", "Deposit")) == {good, poison}
    assert set(listed("--type", "PaymentTaken")) == set(placed)
    assert set(listed("--key", "acc-13")) == {poison}
    slow = listed("--slow", "19")
    assert set(placed) <= set(slow) and all(t["duration_ms"] >= 19 for t in slow.values())
    assert placed[0] not in listed("--slow", str(first["duration_ms"] + 1))
    assert len(listed("-n", "1")) == 1

    # the text view: a line per flow that starts with the id 'choreo trace' takes
    code, out, _ = cli(capsys, "traces", "--peer", seed.endpoint, "--failed", "--color", "never")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["TRACE", "ID", "STARTED", "STATUS"]
    row = next(line for line in lines if line.startswith(placed[0]))
    assert " error " in row and "PlaceOrder -> orders.place_order -> payments, shipping" in row
    assert row.endswith("✗ PaymentTaken in shipping.ship: RuntimeError: no courier for o-0")
    assert lines[-1].startswith("3 of 3 matching flows shown;") and f"choreo trace TRACE_ID --peer {seed.endpoint}" in lines[-1]
    code, out, _ = cli(capsys, "trace", row.split()[0], "--peer", seed.endpoint, "--color", "never")
    assert code == 1 and out.startswith(f"trace {placed[0]}: error, 3 steps")
    code, _, err = cli(capsys, "traces", "--peer", seed.endpoint, "--slow", "-1")
    assert code == 2 and err == "choreo: error: --slow takes milliseconds >= 0, got -1.0\n"


def test_trace_follow_waits_for_a_flow_that_is_still_running(procs, capsys) -> None:  # type: ignore[no-untyped-def]
    seed = procs.start(orders, config=FAST)
    procs.start(payments, peers=[seed.endpoint], config=FAST)
    procs.start(shipping, peers=[seed.endpoint], config=FAST)
    traceparent = new_traceparent()

    async def place_later() -> None:
        async with Node(None, peers=[seed.endpoint], config=FAST) as client:
            await client.wait_for({"orders": 1, "payments": 1, "shipping": 1}, timeout=20)
            await asyncio.sleep(0.5)  # the command leaves while `choreo trace --follow` already watches
            await client.send(PlaceOrder(order_id="o-2"), traceparent=traceparent)

    async def scenario() -> tuple[int, str]:
        follow = asyncio.create_task(
            asyncio.to_thread(
                cli, capsys, "trace", traceparent, "--peer", seed.endpoint, "--follow", "--json",
                "--interval", "0.1", "--quiet", "1.5", "--max-time", "40",
            )
        )  # fmt: skip
        await place_later()
        code, out, _ = await follow
        return code, out

    code, out = asyncio.run(asyncio.wait_for(scenario(), 60))
    views = [json.loads(line) for line in out.splitlines()]
    assert code == 1, "the flow ended with its failing step"
    last = views[-1]
    assert last["status"] == "error" and len(last["steps"]) == 3 and last["failures"] == [2]
    # follow printed the flow as it grew: never more steps than at the end, in causal order
    assert [len(v["steps"]) for v in views] == sorted(len(v["steps"]) for v in views)


# ---- choreo top --------------------------------------------------------------------------------


def test_top_shows_lag_rising_while_a_consumer_is_slow_and_falling_after(procs, capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    flag = tmp_path / "slow"
    flag.touch()
    consumer = procs.start(lagging, config=FAST, env={"CHOREO_SLOW_FLAG": str(flag)})
    keys = [f"k{i}" for i in range(4)]

    def top() -> dict[str, Any]:
        code, out, err = cli(capsys, "top", "--peer", consumer.endpoint, "--json", "--once", "--interval", "0.3")
        assert code == 0, err
        view = json.loads(out)
        assert view["format"] == "choreo-top/1"
        (service,) = [s for s in view["services"] if s["service"] == "lagging"]
        return service

    async def scenario() -> None:
        async with Node(None, peers=[consumer.endpoint], config=FAST) as client:
            await client.wait_for({"lagging": 1}, timeout=20)
            sent = 0

            async def burst(n: int) -> None:
                nonlocal sent
                for _ in range(n):
                    await client.emit(Job(k=keys[sent % 4], n=sent))
                    sent += 1

            await burst(40)
            first = await asyncio.to_thread(top)
            await burst(40)
            second = await asyncio.to_thread(top)
            # slowed (4 keys in parallel, 0.2 s each: ~20/s): the lag builds up as work arrives faster
            assert 0 < first["lag"] < second["lag"], (first, second)
            assert second["lag"] == sum(second["lag_by_partition"].values())
            assert len(second["lag_by_partition"]) >= 2, "the lag is shown per partition"
            (row,) = second["nodes"]
            assert row["lag"] == second["lag"] and row["received"] == 80
            assert second["received_per_s"] is not None and second["processed_per_s"] < 40
            # recovered: the consumer catches up and the lag falls to nothing
            flag.unlink()
            falling = [second["lag"]]

            def caught_up() -> bool:
                falling.append(top()["lag"])
                return falling[-1] == 0

            await asyncio.to_thread(poll, "lag back to 0", caught_up, 30, 0.0)
            assert falling == sorted(falling, reverse=True), f"lag did not only fall: {falling}"
            final = await asyncio.to_thread(top)
            assert final["nodes"][0]["processed"] == 80 and final["lag_by_partition"] == {}

    asyncio.run(asyncio.wait_for(scenario(), 90))

    # the text view shows the same columns
    code, out, _ = cli(capsys, "top", "--peer", consumer.endpoint, "--once", "--interval", "0.2", "--color", "never")
    assert code == 0
    assert "SERVICE / INSTANCE" in out and "IN/s" in out and "LAG" in out
    assert any(line.startswith("lagging ") for line in out.splitlines())


# ---- choreo dlq --------------------------------------------------------------------------------


def test_poison_message_lands_in_the_dlq_and_replay_after_a_fix_processes_it_once(procs, capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    test_started = time.time()
    fix = tmp_path / "fixed"
    node = procs.start(ledger, config=FAST, env={"CHOREO_FIX_FLAG": str(fix)})

    async def deposit(*cents: int) -> None:
        async with Node(None, peers=[node.endpoint], config=FAST) as client:
            await client.wait_for({"ledger": 1}, timeout=20)
            for c in cents:
                await client.emit(Deposit(account="acc-1", cents=c))
            await client.flush(timeout=20)

    asyncio.run(asyncio.wait_for(deposit(1, 13, 2), 60))

    def letters() -> list[dict[str, Any]]:
        code, out, err = cli(capsys, "dlq", "list", "--peer", node.endpoint, "--json")
        assert code == 0, err
        return json.loads(out)["letters"]  # type: ignore[no-any-return]

    (letter,) = poll("one dead letter", letters)
    assert letter["type"] == "Deposit" and letter["service"] == "ledger" and letter["handler"] == "book"
    assert letter["attempts"] == 3, "the first attempt and its 2 retries"
    assert (letter["error_type"], letter["error"]) == ("ValueError", "cannot book 13 cents on acc-1")
    assert letter["payload"] == {"account": "acc-1", "cents": 13}
    assert letter["key"] == "acc-1" and letter["replays"] == 0
    assert letter["ref"] == f"{letter['node']}:{letter['id']}"
    assert records(procs, "ledger") == ["Deposit acc-1 1", "Deposit acc-1 2"]

    code, out, _ = cli(capsys, "dlq", "list", "--peer", node.endpoint)
    assert code == 0 and letter["ref"] in out and "ValueError: cannot book 13 cents on acc-1" in out
    assert '{"account": "acc-1", "cents": 13}' in out
    code, out, _ = cli(capsys, "dlq", "show", letter["ref"], "--peer", node.endpoint, "--json")
    shown = json.loads(out)
    assert code == 0 and shown["payload"] == letter["payload"] and "ValueError: cannot book" in shown["traceback"]

    # still broken: a replay fails again, says so, and the letter comes back with the replay counted
    code, out, _ = cli(capsys, "dlq", "replay", letter["ref"], "--peer", node.endpoint)
    assert (code, out) == (1, f"replayed {letter['ref']} (Deposit, book): failed again: "
                              "ValueError: cannot book 13 cents on acc-1 (back in the store: 'choreo dlq list')\n")  # fmt: skip
    (again,) = [d for d in letters() if d["replays"] == 1]
    assert again["attempts"] == 6 and again["id"] == letter["id"]

    # fixed: replay processes it, exactly once, and says it was handled
    fix.touch()
    code, out, _ = cli(capsys, "dlq", "replay", str(letter["id"]), "--peer", node.endpoint)
    assert (code, out) == (0, f"replayed {letter['ref']} (Deposit, book): handled\n")
    assert "Deposit acc-1 13" in records(procs, "ledger")
    code, _, err = cli(capsys, "dlq", "replay", letter["ref"], "--peer", node.endpoint)
    assert code == 2 and f"no dead letter {letter['ref']}" in err, "a second replay finds nothing to run"
    asyncio.run(asyncio.wait_for(deposit(3), 60))  # same key: booked after anything replayed before it
    poll("the next deposit booked", lambda: "Deposit acc-1 3" in records(procs, "ledger"))
    assert records(procs, "ledger") == ["Deposit acc-1 1", "Deposit acc-1 2", "Deposit acc-1 13", "Deposit acc-1 3"]
    assert letters() == []
    stats = rpc(node.endpoint, "stats")
    assert stats["dead_letters"] == 0 and stats["dead_lettered"] == 2

    # the letter's trace: one step whose replays are its later attempts, on one clock
    code, out, _ = cli(capsys, "trace", letter["trace_id"], "--peer", node.endpoint, "--json")
    assert code == 0, out
    doc = json.loads(out)
    (step,) = doc["steps"]
    log = step["attempt_log"]
    assert [(a["attempt"], a["replay"], a["outcome"]) for a in log] == [
        (1, 0, "error"), (2, 0, "error"), (3, 0, "error"),  # as it arrived: first attempt and 2 retries
        (4, 1, "error"), (5, 1, "error"), (6, 1, "error"),  # the first replay, still broken
        (7, 2, "ok"),  # the second, after the fix
    ]  # fmt: skip
    assert (step["outcome"], step["attempts"], step["replays"], doc["status"]) == ("ok", 7, 2, "ok")
    starts = [a["started"] for a in log]
    assert starts == sorted(starts) and all(a["started"] <= a["finished"] for a in log)
    # the whole flow, replays included, took no longer than this test has been running
    assert 0 <= doc["duration_ms"] <= (time.time() - test_started) * 1000
    code, out, _ = cli(capsys, "trace", letter["trace_id"], "--peer", node.endpoint, "--color", "never")
    assert "Deposit -> ledger.book" in out and "7 attempts (1 in replay 2)" in out


# ---- Prometheus metrics ------------------------------------------------------------------------


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
            if family.type == "counter":
                _COUNTER_SAMPLES.add(s.name)
    return out


_COUNTER_SAMPLES: set[str] = set()


def _listening_ports(pid: int) -> set[int]:
    """TCP ports a process listens on, from /proc (its socket inodes in /proc/net/tcp{,6})."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc to list a process's sockets")
def test_prometheus_scrape_parses_counters_only_grow_and_no_port_without_the_option(procs) -> None:  # type: ignore[no-untyped-def]
    with_metrics = procs.start(ledger, config=FAST, metrics_port=0, env={"CHOREO_FIX_FLAG": "/nonexistent"})
    without = procs.start(lagging, peers=[with_metrics.endpoint], config=FAST, env={"CHOREO_SLOW_FLAG": "/nonexistent"})
    assert with_metrics.metrics_url is not None and with_metrics.metrics_url.startswith("http://127.0.0.1:")
    assert without.metrics_url is None
    zmq_port = int(with_metrics.endpoint.rsplit(":", 1)[1])
    metrics_port = int(with_metrics.metrics_url.split(":")[2].split("/")[0])
    # the node without the option listens on its ZeroMQ port only; the other on one more
    assert _listening_ports(without.pid) == {int(without.endpoint.rsplit(":", 1)[1])}
    assert _listening_ports(with_metrics.pid) == {zmq_port, metrics_port}

    labels = (("node", with_metrics.node_name), ("service", "ledger"))
    scrapes = [_scrape(with_metrics.metrics_url)]

    async def traffic(cents: list[int]) -> None:
        async with Node(None, peers=[with_metrics.endpoint], config=FAST) as client:
            await client.wait_for({"ledger": 1}, timeout=20)
            for c in cents:
                await client.emit(Deposit(account=f"a{c % 5}", cents=c))
            await client.flush(timeout=20)

    asyncio.run(asyncio.wait_for(traffic([1, 2, 13, 4, 5]), 60))  # 13 is poison: failed attempts, a dead letter
    poll("the poison message dead-lettered",
         lambda: _scrape(with_metrics.metrics_url)[("choreo_dead_lettered_total", labels)] == 1)  # fmt: skip
    scrapes.append(_scrape(with_metrics.metrics_url))
    asyncio.run(asyncio.wait_for(traffic(list(range(20, 60))), 60))
    scrapes.append(_scrape(with_metrics.metrics_url))

    first, second, third = scrapes
    assert ("choreo_processed_total", labels) in first
    assert first[("choreo_processed_total", labels)] == 0
    assert second[("choreo_received_total", labels)] == 5 and second[("choreo_processed_total", labels)] == 5
    assert second[("choreo_failed_attempts_total", labels)] == 3
    assert second[("choreo_dead_letters", labels)] == 1
    assert third[("choreo_processed_total", labels)] == 45
    counters = {k for k in third if k[0] in _COUNTER_SAMPLES}
    assert {"choreo_received_total", "choreo_processed_total", "choreo_redelivered_total",
            "choreo_dedup_hits_total", "choreo_backpressure_waits_total"} <= {k[0] for k in counters}  # fmt: skip
    for key in counters:
        values = [s.get(key, 0.0) for s in scrapes]
        assert values == sorted(values), f"counter {key} went down: {values}"
    # a gauge is there too, labelled per partition
    assert any(k[0] == "choreo_peers" for k in third)


def _openmetrics(url: str) -> dict[str, Any]:
    """One OpenMetrics scrape (as Prometheus asks for it), parsed: family name -> family."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    request = urllib.request.Request(url, headers={"Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
        return {f.name: f for f in text_string_to_metric_families(response.read().decode())}


def _histogram(families: dict[str, Any], name: str, **labels: str) -> dict[str, Any]:
    """count, sum and the buckets (le -> sample) of one labelled series of a histogram family."""
    out: dict[str, Any] = {"buckets": {}}
    for s in families[name].samples:
        if all(s.labels.get(k) == v for k, v in labels.items()):
            if s.name.endswith("_bucket"):
                out["buckets"][s.labels["le"]] = s
            else:
                out[s.name.rsplit("_", 1)[1]] = s.value
    return out


def test_metrics_histograms_of_handler_queue_and_flow_time_with_trace_exemplars(procs) -> None:  # type: ignore[no-untyped-def]
    seed = procs.start(orders, config=FAST, metrics_port=0)
    pay = procs.start(payments, peers=[seed.endpoint], config=FAST, metrics_port=0)
    procs.start(shipping, peers=[seed.endpoint], config=FAST)
    books = procs.start(ledger, peers=[seed.endpoint], config=FAST, metrics_port=0, env={"CHOREO_FIX_FLAG": "/nonexistent"})
    placed = trace_id_of(new_traceparent())

    async def traffic() -> list[str]:
        async with Node(None, peers=[seed.endpoint], config=FAST) as client:
            await client.wait_for({"orders": 1, "payments": 1, "shipping": 1, "ledger": 1}, timeout=20)
            await client.send(PlaceOrder(order_id="o-9"), traceparent=f"00-{placed}-{'2' * 16}-01")
            ids = [(await client.emit(Deposit(account=f"a{c % 3}", cents=c))).hex() for c in (1, 2, 3, 13)]
            await client.flush(timeout=20)
            return ids

    deposits = asyncio.run(asyncio.wait_for(traffic(), 60))

    def ledger_folded() -> dict[str, Any] | None:
        families = _openmetrics(books.metrics_url)
        error = _histogram(families, "choreo_handler_seconds", type="Deposit", handler="book", outcome="error")
        return families if error.get("count") == 3 else None

    families = poll("the ledger's spans folded", ledger_folded, 20)
    ok = _histogram(families, "choreo_handler_seconds", type="Deposit", handler="book", outcome="ok")
    assert ok["count"] == 3 and ok["buckets"]["+Inf"].value == 3
    les = [float(le) for le in ok["buckets"]]
    assert les == sorted(les) and les[-1] == float("inf")
    counts = [ok["buckets"][le].value for le in ok["buckets"]]
    assert counts == sorted(counts), "buckets are cumulative"
    exemplars = {b.exemplar.labels["trace_id"] for b in ok["buckets"].values() if b.exemplar is not None}
    assert exemplars and exemplars <= set(deposits), "exemplars name the traces of the deposits"
    queue = _histogram(families, "choreo_queue_wait_seconds", type="Deposit", handler="book")
    assert queue["count"] == 4, "one wait per message (first attempts)"
    # each deposit came from outside and set nothing in motion: its flow ended with its handler
    flow_ok = _histogram(families, "choreo_flow_seconds", type="Deposit", handler="book", outcome="ok")
    assert flow_ok["count"] == 3
    handled = {(s.labels["outcome"]): s.value for s in families["choreo_handled"].samples if s.labels["type"] == "Deposit"}
    assert handled == {"ok": 3, "error": 3}
    assert families["choreo_spans_unfolded"].samples[0].value == 0

    # PlaceOrder's flow at orders ends only when payments (20 ms of work) and shipping acknowledged
    def orders_flow() -> dict[str, Any] | None:
        flow = _histogram(_openmetrics(seed.metrics_url), "choreo_flow_seconds", type="PlaceOrder", handler="place_order")
        return flow if flow.get("count") == 1 else None

    flow = poll("PlaceOrder's flow complete at orders", orders_flow, 30)
    took = _histogram(_openmetrics(pay.metrics_url), "choreo_handler_seconds", type="OrderPlaced", handler="take_payment")
    assert took["count"] == 1 and took["sum"] >= 0.02
    assert flow["sum"] >= took["sum"], "the entry's flow time covers the steps downstream"
    (exemplar,) = {b.exemplar.labels["trace_id"] for b in flow["buckets"].values() if b.exemplar is not None}
    assert exemplar == placed
    # the Prometheus text format (no Accept header) has the same series, without exemplars
    assert ("choreo_flow_seconds_count", (("handler", "place_order"), ("node", seed.node_name), ("outcome", "ok"),
            ("service", "orders"), ("type", "PlaceOrder"))) in _scrape(seed.metrics_url)  # fmt: skip


# ---- observed vs declared ----------------------------------------------------------------------


def test_graph_observed_marks_edges_never_seen_and_edges_nobody_declared(procs, capsys) -> None:  # type: ignore[no-untyped-def]
    seed = procs.start(orders, config=FAST)
    procs.start(payments, peers=[seed.endpoint], config=FAST)
    procs.start(shipping, peers=[seed.endpoint], config=FAST)
    traceparent = new_traceparent()

    async def place() -> None:
        async with Node(None, peers=[seed.endpoint], config=FAST) as client:
            await client.wait_for({"orders": 1, "payments": 1, "shipping": 1}, timeout=20)
            await client.send(PlaceOrder(order_id="o-3"), traceparent=traceparent)

    asyncio.run(asyncio.wait_for(place(), 60))
    poll("the flow's spans", lambda: cli(capsys, "trace", traceparent, "--peer", seed.endpoint)[0] == 1, 30)

    def edges(*args: str) -> dict[str, tuple[str, int]]:
        code, out, err = cli(capsys, "graph", *args, "--peer", seed.endpoint, "--observed", "--format", "json")
        assert code == 0, err
        doc = json.loads(out)
        assert doc["observed"]["spans"] >= 4  # place, take_payment, ship x2
        return {f"{e['source']} {e['relation']} {e['target']}": (e["status"], e["count"]) for e in doc["observed"]["edges"]}

    # declarations from the mesh itself: everything that ran is declared; Shipped was never emitted
    live = edges()
    assert live["message:PlaceOrder handles service:orders"] == ("seen", 1)
    assert live["service:orders emits message:OrderPlaced"] == ("seen", 1)
    assert live["message:OrderPlaced handles service:payments"] == ("seen", 1)
    assert live["service:payments emits message:PaymentTaken"] == ("seen", 1)
    assert live["message:PaymentTaken handles service:shipping"] == ("seen", 1)
    assert live["service:shipping emits message:Shipped"] == ("never-seen", 0)
    assert not [k for k, (status, _) in live.items() if status == "undeclared"]
    # declarations from an older revision of the code: the mesh does more than it declares
    drift = edges("integration.observed_drift")
    assert drift["service:payments emits message:PaymentTaken"] == ("undeclared", 1)
    assert [k for k, (status, _) in drift.items() if status == "undeclared"] == ["service:payments emits message:PaymentTaken"]
    # the text view marks both kinds
    code, out, _ = cli(capsys, "graph", "integration.observed_drift", "--peer", seed.endpoint, "--observed", "--color", "never")
    assert code == 0
    assert "  ! undeclared    1  payments --emits--> PaymentTaken" in out
    assert "  · never seen    -  shipping --emits--> Shipped  (ship)" in out
    code, out, _ = cli(capsys, "graph", "integration.observed_drift", "--peer", seed.endpoint, "--observed", "--format", "dot")
    assert code == 0 and 'label="undeclared x1"' in out and 'style="dotted"' in out
