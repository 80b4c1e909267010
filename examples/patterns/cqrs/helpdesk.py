"""The helpdesk: agents open, assign and close tickets (some commands break the rules), then
the team lead reads the dashboard."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from choreo import Service

from .messages import (
    CLOSED,
    UNASSIGNED,
    AssignTicket,
    CloseTicket,
    Decision,
    GetLane,
    GetWorkload,
    LaneView,
    OpenTicket,
    Row,
)

helpdesk = Service("helpdesk", sends=[OpenTicket, AssignTicket, CloseTicket, GetWorkload, GetLane],
                   doc="the helpdesk app")

AGENTS = ["ana", "bo", "cy", "di"]
TOPICS = ["printer", "vpn", "laptop", "password", "badge", "monitor"]


def script(tickets: int, seed: int) -> list[OpenTicket | AssignTicket | CloseTicket]:
    """Open every ticket; assign, reassign and close at random, with some commands that must be refused."""
    rng = random.Random(seed)
    out: list[OpenTicket | AssignTicket | CloseTicket] = []
    opened: list[str] = []
    for n in range(tickets):
        tid = f"T{n:03d}"
        out.append(OpenTicket(tid, f"{rng.choice(TOPICS)} problem #{n}"))
        opened.append(tid)
        for _ in range(rng.randint(0, 3)):
            target = rng.choice(opened)
            out.append(AssignTicket(target, rng.choice(AGENTS)) if rng.random() < 0.7 else CloseTicket(target))
    return out


def model(commands) -> tuple[list[bool], dict[str, list[str]], tuple[int, int, int]]:
    """What the rules decide, and the read model that should follow, computed without choreo."""
    state: dict[str, dict] = {}
    decisions = []
    for c in commands:
        t = state.get(c.ticket_id)
        if isinstance(c, OpenTicket):
            ok = t is None
            if ok:
                state[c.ticket_id] = {"closed": False, "agent": None, "order": len(state)}
        elif isinstance(c, AssignTicket):
            ok = t is not None and not t["closed"] and t["agent"] != c.agent
            if ok:
                t["agent"], t["assigned_at"] = c.agent, len(decisions)
        else:
            ok = t is not None and not t["closed"]
            if ok:
                t["closed"] = True
        decisions.append(ok)
    workload: dict[str, list[str]] = {}
    for tid, t in sorted(state.items(), key=lambda kv: kv[1].get("assigned_at", 0)):
        if t["agent"] and not t["closed"]:
            workload.setdefault(t["agent"], []).append(tid)
    unassigned = sum(1 for t in state.values() if not t["agent"] and not t["closed"])
    closed = sum(1 for t in state.values() if t["closed"])
    return decisions, workload, (unassigned, sum(len(v) for v in workload.values()), closed)


@dataclass
class Outcome:
    decisions: list[Decision] = field(default_factory=list)
    workloads: dict[str, list[Row]] = field(default_factory=dict)
    lanes: dict[str, LaneView] = field(default_factory=dict)  # every lane, agents' included
    counts: tuple[int, int, int] = (0, 0, 0)  # tickets unassigned, assigned, closed: from the lanes
    problems: list[str] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        return 1 if self.problems else 0


async def drive(client, system, tickets: int = 25, seed: int = 8) -> Outcome:
    commands = script(tickets, seed)
    out = Outcome()
    for cmd in commands:
        out.decisions.append(await client.send(cmd))
    # No waiting for the read side to catch up: a command's answer comes once the events it
    # emitted were acknowledged, i.e. handled by every dashboard replica.
    # Each lane is one key of the read model: the counts are its lanes' sizes, asked lane by lane.
    for agent in AGENTS:
        out.workloads[agent] = await client.ask(GetWorkload(agent))
    for lane in [UNASSIGNED, *AGENTS, CLOSED]:
        out.lanes[lane] = await client.ask(GetLane(lane))
    out.counts = (len(out.lanes[UNASSIGNED].rows), sum(len(out.lanes[a].rows) for a in AGENTS),
                  len(out.lanes[CLOSED].rows))
    decisions, workload, counts = model(commands)
    if [d.accepted for d in out.decisions] != decisions:
        out.problems.append("the write side decided differently from the rules' model")
    got = {a: [r.ticket_id for r in rows] for a, rows in out.workloads.items() if rows}
    if got != workload:
        out.problems.append(f"workloads {got} differ from the model {workload}")
    if out.counts != counts:
        out.problems.append(f"counts {out.counts} differ from the model {counts}")
    if any(out.lanes[a].rows != out.workloads[a] for a in AGENTS):
        out.problems.append("an agent's lane and workload differ")
    refused = [d.reason for d in out.decisions if not d.accepted]
    holders: dict[str, list[str]] = {}
    for lane, view in out.lanes.items():
        holders.setdefault(view.answered_by, []).append(lane)
    print(f"{len(commands)} commands to the write side: {len(commands) - len(refused)} accepted, {len(refused)} refused "
          f"by its rules (e.g. {refused[0] if refused else '-'})")
    print("read side, workloads: " + ", ".join(f"{a} {len(r)}" for a, r in out.workloads.items())
          + f"; tickets unassigned/assigned/closed: {counts[0]}/{counts[1]}/{counts[2]}")
    print("read side, partitioned by lane: " + "; ".join(f"{i} holds {', '.join(ls)}" for i, ls in sorted(holders.items())))
    print("read model matches the model of the accepted commands" if not out.problems else "PROBLEMS: " + "; ".join(out.problems))
    return out
