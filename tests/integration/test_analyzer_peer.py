"""`choreo graph --peer`: a running mesh gives the analyzer the same system as the services' code.

Nodes run in this process over tcp on 127.0.0.1; the analyzer asks one of them through
choreo.client, from a worker thread (the client is synchronous, the nodes share this event loop).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # tests/, so analyzer_systems imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from choreo.analyzer import analyze, render
from choreo.analyzer._load import collect_services, load_spec
from choreo.cli import main
from choreo.node import Node, NodeConfig
from choreo.spec import system_spec

FAST = NodeConfig(heartbeat=0.05, suspect_after=0.5, dead_after=1.0, tick=0.005)


async def _with_mesh(module: str, check) -> None:  # type: ignore[no-untyped-def]
    services = collect_services(module)
    nodes: list[Node] = []
    try:
        for svc in services:
            node = Node(svc, bind="tcp://127.0.0.1:0", peers=[nodes[0].endpoint] if nodes else [], config=FAST)
            await node.start()
            nodes.append(node)
        for node in nodes:
            await node.wait_for({s.name: 1 for s in services}, timeout=10)
        await check(services, nodes)
    finally:
        for node in nodes:
            await node.stop(drain=False, timeout=5)


def test_a_mesh_reads_back_as_the_code_declares_it() -> None:
    async def check(services, nodes) -> None:  # type: ignore[no-untyped-def]
        spec, name = await asyncio.to_thread(load_spec, peer=nodes[-1].endpoint, timeout=5.0)
        local = system_spec(services)
        assert name == nodes[-1].endpoint
        assert {s.name: s for s in spec.services} == {s.name: s for s in local.services}
        assert spec.messages == local.messages
        a, b = analyze(spec), analyze(local)
        assert [f.entry for f in a.flows] == [f.entry for f in b.flows]
        assert [(f.depth, f.fan_out) for f in a.flows] == [(f.depth, f.fan_out) for f in b.flows]
        assert a.findings == b.findings == []
        assert "PlaceOrder (command, from storefront): depth 4" in render(a, "text")

    asyncio.run(asyncio.wait_for(_with_mesh("analyzer_systems.shop", check), 60))


def test_choreo_lint_peer_reports_the_mesh_findings(capsys) -> None:  # type: ignore[no-untyped-def]
    # A node refuses to start declarations with error-level problems, so a live mesh carries
    # warnings at most: lint passes, and fails with --fail-on warning.
    async def check(services, nodes) -> None:  # type: ignore[no-untyped-def]
        peer = nodes[0].endpoint
        assert await asyncio.to_thread(main, ["lint", "--peer", peer, "--timeout", "5"]) == 0
        out = capsys.readouterr().out
        assert "event UserRegistered is emitted by accounts.register but no service consumes it" in out
        assert "at accounts.register  analyzer_systems.warned:17" in out
        assert await asyncio.to_thread(main, ["lint", "--peer", peer, "--fail-on", "warning"]) == 1

    asyncio.run(asyncio.wait_for(_with_mesh("analyzer_systems.warned", check), 60))
