"""dashboard, the read side: views shaped for the questions asked, built from the board's events.

Every ticket is in one *lane*: unassigned, an agent's, or closed. The read model keeps each
lane's rows in ``ctx.state`` under the lane's key, so GetWorkload(agent) reads one key, and a
:class:`Card` per ticket (its title, its lane) under the ticket's key. The board's events come
keyed by ticket: the dashboard moves the ticket by sending itself LeaveLane and JoinLane, keyed
by lane. Both move with their partitions and have a standby copy (``replicas=1``): the read side
scales by adding instances, and a crash of one loses no row.
"""

import msgspec

from choreo import Service

from .messages import (
    CLOSED,
    UNASSIGNED,
    GetLane,
    GetWorkload,
    JoinLane,
    LaneView,
    LeaveLane,
    Row,
    TicketAssigned,
    TicketClosed,
    TicketOpened,
)


class Card(msgspec.Struct, frozen=True):
    """Per ticket: what its row shows, and the lane it is in."""

    title: str
    lane: str


class Lane(msgspec.Struct, frozen=True):
    """Per lane: its tickets, in the order they entered it (oldest first)."""

    rows: list[Row] = []


dashboard = Service("dashboard", state=[Card, Lane], replicas=1)


def _move(ctx, ticket_id: str, to: str) -> None:
    card = ctx.state.get(Card)
    if card is None or card.lane == to:
        return
    ctx.send(LeaveLane(card.lane, ticket_id))
    ctx.send(JoinLane(to, ticket_id, card.title))
    ctx.state.put(Card(card.title, to))


@dashboard.on(TicketOpened, sends=[JoinLane])
def opened(event: TicketOpened, ctx) -> None:
    if ctx.state.get(Card) is None:
        ctx.state.put(Card(event.title, UNASSIGNED))
        ctx.send(JoinLane(UNASSIGNED, event.ticket_id, event.title))


@dashboard.on(TicketAssigned, sends=[JoinLane, LeaveLane])
def assigned(event: TicketAssigned, ctx) -> None:
    _move(ctx, event.ticket_id, event.agent)


@dashboard.on(TicketClosed, sends=[JoinLane, LeaveLane])
def closed(event: TicketClosed, ctx) -> None:
    _move(ctx, event.ticket_id, CLOSED)


@dashboard.command(JoinLane)
def join_lane(cmd: JoinLane, ctx) -> None:
    lane = ctx.state.get(Lane) or Lane()
    if all(row.ticket_id != cmd.ticket_id for row in lane.rows):
        ctx.state.put(Lane([*lane.rows, Row(cmd.ticket_id, cmd.title)]))


@dashboard.command(LeaveLane)
def leave_lane(cmd: LeaveLane, ctx) -> None:
    lane = ctx.state.get(Lane) or Lane()
    ctx.state.put(Lane([row for row in lane.rows if row.ticket_id != cmd.ticket_id]))


@dashboard.query(GetWorkload)
def workload(query: GetWorkload, ctx) -> list[Row]:
    return list((ctx.state.get(Lane) or Lane()).rows)


@dashboard.query(GetLane)
def lane(query: GetLane, ctx) -> LaneView:
    return LaneView(query.lane, list((ctx.state.get(Lane) or Lane()).rows), ctx.instance)
