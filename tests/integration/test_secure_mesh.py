"""A secure mesh as a user meets it: nodes with keys, clients with and without one, the CLI with
``--keys``, and no node that binds beyond loopback without keys unless told ``--insecure``."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from choreo.cli import main
from choreo.client import rpc, set_security
from choreo.errors import ChoreoUsageError, DeliveryTimeout
from choreo.client import RpcError
from choreo.node import Node
from choreo.trust import Security, create_key

from .recording import OrderAccepted, PlaceOrder, orders

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "keys"
    create_key(d, "orders-1", serves=["orders"])
    create_key(d, "mobile", originates=["PlaceOrder"])
    create_key(d, "ops", admin=["*"])
    try:
        yield d
    finally:
        set_security(None)  # what --keys set for this process's clients


def test_a_command_crosses_a_secure_mesh_and_queries_need_a_trusted_key(procs, keys: Path, tmp_path: Path) -> None:
    server = procs.start(orders, security=Security.load(keys, "orders-1"))
    assert server.endpoint.startswith("orders-1@tcp://127.0.0.1:")

    async def place() -> OrderAccepted:
        async with Node(None, peers=[server.endpoint], security=Security.load(keys, "mobile")) as client:
            await client.wait_for({"orders": 1}, timeout=20)
            return await client.send(PlaceOrder(customer_id="c", cart_id="k", request_id="r"), timeout=10)

    assert asyncio.run(asyncio.wait_for(place(), 60)) == OrderAccepted(order_id="order-k", attempt_request_id="r")
    # a system query: with a trusted key it is answered ...
    assert rpc(server.endpoint, "stats", security=Security.load(keys, "ops"))["processed"] >= 1
    # ... without one the client says what to give it ...
    with pytest.raises(ChoreoUsageError, match="is a node of a secure mesh: give a key it trusts, --keys DIR --as NAME"):
        rpc(server.endpoint, "stats")
    # ... with an untrusted one the node refuses it, and the client says so at once
    create_key(tmp_path / "other", "stranger")
    shutil.copy(keys / "orders-1.key", tmp_path / "other")
    with pytest.raises(RpcError, match="refused the key 'stranger': it is not in that node's trusted keys"):
        rpc(server.endpoint, "stats", security=Security.load(tmp_path / "other", "stranger"))
    # and the plain address answers nothing: CURVE or nothing
    with pytest.raises(DeliveryTimeout):
        rpc(server.endpoint.split("@", 1)[1], "stats", timeout=1.0)
    assert rpc(server.endpoint, "stats", security=Security.load(keys, "ops"))["refused"]["untrusted_key"] >= 1


def test_the_cli_asks_a_secure_mesh_with_keys(procs, keys: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server = procs.start(orders, security=Security.load(keys, "orders-1"))
    capsys.readouterr()
    assert main(["top", "--peer", server.endpoint, "--once", "--json"]) == 2
    assert "give a key it trusts, --keys DIR --as NAME" in capsys.readouterr().err
    assert main(["top", "--peer", server.endpoint, "--once", "--json", "--keys", str(keys), "--as", "ops"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert [s["service"] for s in view["services"]] == ["orders"]
    assert main(["graph", "--peer", server.endpoint, "--format", "json", "--keys", str(keys), "--as", "ops"]) == 0
    assert "PlaceOrder" in capsys.readouterr().out


def test_a_secure_node_needs_keyed_seeds(keys: Path) -> None:
    security = Security.load(keys, "mobile")
    with pytest.raises(ChoreoUsageError, match=r"peer tcp://127.0.0.1:7000 names no key: in a secure mesh give it as "
                                               r"KEY@tcp://127.0.0.1:7000"):
        Node(None, peers=["tcp://127.0.0.1:7000"], security=security)
    with pytest.raises(ChoreoUsageError, match=r"no trusted key 'payments-9' \(no payments-9.key in "):
        Node(None, peers=["payments-9@tcp://127.0.0.1:7000"], security=security)
    with pytest.raises(ChoreoUsageError, match="is a secure node: give this node keys"):
        Node(None, peers=["orders-1@tcp://127.0.0.1:7000"])
    with pytest.raises(ChoreoUsageError, match="peer: port 99999 out of range"):
        Node(None, peers=["tcp://127.0.0.1:99999"])


def test_no_keys_no_network_unless_insecure(keys: Path) -> None:
    with pytest.raises(ChoreoUsageError, match=r"refusing to bind tcp://0.0.0.0:0 without keys: .*choreo keys new NAME"):
        Node(orders, bind="tcp://0.0.0.0:0")
    Node(orders, bind="tcp://0.0.0.0:0", insecure=True)
    Node(orders, bind="tcp://0.0.0.0:0", security=Security.load(keys, "orders-1"))
    for local in ("tcp://127.0.0.1:0", "tcp://127.5.0.1:0", "tcp://localhost:0", "tcp://[::1]:0", "ipc:///tmp/x"):
        Node(orders, bind=local)


def _run(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "choreo", "run", "tests.integration.recording:orders", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_choreo_run_refuses_a_public_bind_without_keys_in_one_line(keys: Path) -> None:
    done = _run("--bind", "tcp://0.0.0.0:0")
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("choreo: error: refusing to bind tcp://0.0.0.0:0 without keys"), done.stderr
    assert "choreo keys new NAME" in lines[0] and "--insecure" in lines[0]
    done = _run("--bind", "tcp://127.0.0.1:0", "--keys", str(keys))
    assert done.returncode == 2 and "give both --keys DIR and --key NAME" in done.stderr
    done = _run("--keys", str(keys), "--key", "nobody")
    assert done.returncode == 2 and "no secret key" in done.stderr and "choreo keys new nobody" in done.stderr


def test_choreo_run_with_keys_or_insecure_starts(keys: Path) -> None:
    # a wildcard bind advertises the interface other hosts reach (choreo.endpoints.advertised)
    for args, prefix in ((["--bind", "tcp://0.0.0.0:0", "--insecure"], "tcp://"),
                         (["--bind", "tcp://0.0.0.0:0", "--keys", str(keys), "--key", "orders-1"], "orders-1@tcp://")):
        proc = subprocess.Popen([sys.executable, "-m", "choreo", "run", "tests.integration.recording:orders", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            line = proc.stdout.readline()  # the ready line, or EOF if it failed
            assert line.startswith("choreo-ready " + prefix), (line, proc.stderr.read() if proc.poll() is not None else "")
        finally:
            proc.terminate()
            proc.wait(15)


def test_keys_keep_members_in_their_lane(procs, keys: Path) -> None:
    """Real processes: a member's key does only what its rights say."""
    from choreo import NotAllowed

    from .recording import OrderCount

    create_key(keys, "rogue", serves=["billing"])  # a trusted member, of another service
    server = procs.start(orders, security=Security.load(keys, "orders-1"))

    async def scenario() -> None:
        # a client key may send its entry point, but not ask what it may not originate
        async with Node(None, peers=[server.endpoint], security=Security.load(keys, "mobile")) as client:
            await client.wait_for({"orders": 1}, timeout=20)
            with pytest.raises(NotAllowed, match=r"key 'mobile' may not originate OrderCount \(it originates: PlaceOrder\)"):
                await client.ask(OrderCount(customer_id="c"), timeout=10)
        # a key that serves billing cannot claim to be an instance of orders (its partitions, its commands)
        impostor = Node(orders, peers=[server.endpoint], security=Security.load(keys, "rogue"))
        await impostor.start()
        try:
            with pytest.raises(TimeoutError):
                await impostor.wait_for({"orders": 2}, timeout=3)
            assert impostor.stats().state == "joining"
        finally:
            impostor.kill()
        # nor read the node's dead letters or replay them: admin rights only
        with pytest.raises(RpcError, match=r"not allowed: key 'mobile' may not call dlq.list"):
            await asyncio.to_thread(rpc, server.endpoint, "dlq.list", security=Security.load(keys, "mobile"))

    asyncio.run(asyncio.wait_for(scenario(), 60))
    refused = rpc(server.endpoint, "stats", security=Security.load(keys, "ops"))["refused"]
    assert refused["not_allowed"] >= 3, refused
