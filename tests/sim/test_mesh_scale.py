"""Membership at scale (choreo.meshsim): the gossip part alone, CHOREO_SIM_NODES nodes (100 in
``make test``, 1,000 in ``make soak``) on a fake link under a virtual clock.

What a user of a large mesh would notice: everyone hears of a join, a crash and a graceful leave
within O(log n) protocol periods (plus, for a crash, the suspicion it must sit out); membership
costs a node the same frames and bytes per period whatever the mesh's size; a lossy network
raises few suspicions and kills nobody. Periods are the protocol's own (``heartbeat``), virtual.
"""

from __future__ import annotations

import math
import os

import pytest

from choreo.meshsim import MeshSim

NODES = int(os.environ.get("CHOREO_SIM_NODES", "100"))


def test_everyone_hears_of_a_join_a_crash_and_a_leave_within_log_n_periods() -> None:
    sim = MeshSim(seed=11)
    sim.bootstrap(NODES)
    periods = sim.churn()
    config = sim.config
    spread = 3 * math.log2(NODES)  # rounds of an epidemic, generously
    suspicion = (config.suspect_after + config.dead_after) / config.heartbeat
    assert periods["join"] <= spread, periods
    assert periods["leave"] <= spread, periods
    assert periods["crash_spread"] <= spread, periods
    assert suspicion <= periods["crash"] <= suspicion + 10 + spread, periods  # 10: until some probe hits it
    assert len({whom for _, _, whom in sim.deaths}) == 1, "one death: the crash (the leave is no death)"


def test_membership_costs_a_node_the_same_whatever_the_mesh_size() -> None:
    cost = {}
    for n in (10, NODES):
        sim = MeshSim(seed=12)
        sim.bootstrap(n)
        sim.run(5 * sim.config.heartbeat)
        mark = sim.mark()
        sim.run(40 * sim.config.heartbeat)  # two anti-entropy rounds
        cost[n] = sim.traffic(mark)
    small, large = cost[10], cost[NODES]
    assert large.frames <= 2.5, f"one ping, one pong and a share of anti-entropy per period: {large}"
    assert large.bytes <= 2 * small.bytes, f"bytes per node per period: {small.bytes:.0f} at 10, {large.bytes:.0f} at {NODES}"


@pytest.mark.parametrize("loss", [0.01, 0.05])
def test_a_lossy_network_raises_few_suspicions_and_kills_nobody(loss: float) -> None:
    sim = MeshSim(seed=13, loss=loss)
    sim.bootstrap(NODES)
    periods = 100
    sim.run(periods * sim.config.heartbeat)
    rate = len(sim.suspicions) / (NODES * periods)
    assert not sim.deaths and not any(n.rejoins for n in sim.nodes.values()), f"{sim.deaths[:3]} (seed {sim.seed})"
    assert rate <= loss / 10, f"{len(sim.suspicions)} suspicions in {periods} periods of {NODES} nodes (seed {sim.seed})"
