"""A node bound to every interface is dialled back at an address other hosts reach (issue 21).

Two hosts (network namespaces on one bridge; the test process is a third, on the bridge): a
service bound to ``tcp://0.0.0.0:0`` must advertise its bridge address, not loopback, so that a
client on another host that joins through it gets every message acknowledged. A client that
advertises loopback while its seed is on another host is told so at start, naming the seed, and
its flush says which peer never acknowledged and that it may not be able to dial back.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from choreo.client import rpc
from choreo.node import Node, NodeConfig

from .netns import Hosts
from .observed import Deposit, ledger

pytestmark = [pytest.mark.slow, pytest.mark.netns]

FAST = NodeConfig(heartbeat=0.1, suspect_after=1.0, dead_after=3.0)


def test_a_wildcard_bind_advertises_the_address_other_hosts_reach(procs) -> None:  # type: ignore[no-untyped-def]
    with Hosts(1) as hosts:
        # hosts of a private test network, without keys: insecure on purpose
        server = procs.start(ledger, netns=hosts.namespace(1), bind="tcp://0.0.0.0:0", config=FAST, insecure=True,
                             env={"CHOREO_FIX_FLAG": "/nonexistent"})  # fmt: skip
        host, port = server.endpoint.removeprefix("tcp://").rsplit(":", 1)
        assert host == hosts.address(1), f"advertised {server.endpoint}, not the bridge address"

        async def deposits() -> None:
            async with Node(None, bind=f"tcp://{hosts.gateway}:0", peers=[server.endpoint], config=FAST,
                            insecure=True) as client:
                await client.wait_for({"ledger": 1}, timeout=20)
                for i in range(1000):
                    await client.emit(Deposit(account=f"a{i % 7}", cents=1))
                await client.flush(timeout=30)

        asyncio.run(asyncio.wait_for(deposits(), 90))
        assert rpc(server.endpoint, "stats")["processed"] == 1000


def test_a_client_that_cannot_be_dialled_back_is_told_by_name(procs, caplog) -> None:  # type: ignore[no-untyped-def]
    with Hosts(1) as hosts:
        server = procs.start(ledger, netns=hosts.namespace(1), bind=f"tcp://{hosts.address(1)}:0", config=FAST, insecure=True,
                             env={"CHOREO_FIX_FLAG": "/nonexistent"})  # fmt: skip
        caplog.set_level(logging.WARNING, logger="choreo.transport")
        failure: list[str] = []

        async def stuck() -> None:
            client = await Node(None, bind="tcp://127.0.0.1:0", peers=[server.endpoint], config=FAST).start()
            try:
                await client.wait_for({"ledger": 1}, timeout=5)
            except TimeoutError as exc:
                failure.append(str(exc))
            finally:
                client.kill()  # nobody to say goodbye to

        asyncio.run(asyncio.wait_for(stuck(), 60))
        warned = [r.getMessage() for r in caplog.records if "loopback" in r.getMessage()]
        assert warned and f"while joining through {server.endpoint}" in warned[0] and "--advertise" in warned[0]
        assert failure == [
            f"{failure[0].split(':')[0]}: waited 5.0 s for services {{'ledger': 1}}, the mesh has {{'ledger': 0}}; "
            f"no node answered: the seeds ({server.endpoint}) are down, or cannot dial back to this node at "
            f"{failure[0].split(' at ')[1].split(' ')[0]} (a loopback address: bind an address they reach, "
            "or pass --advertise)"
        ]
