"""CQRS: commands change the ticket board (write side), queries read the dashboard (read side)."""

from __future__ import annotations

import msgspec

from choreo import Command, Event, Query


class Decision(msgspec.Struct, frozen=True):
    accepted: bool
    reason: str = ""


class OpenTicket(Command, key="ticket_id", idempotency=["ticket_id"], returns=Decision):
    ticket_id: str
    title: str


class AssignTicket(Command, key="ticket_id", returns=Decision):
    ticket_id: str
    agent: str


class CloseTicket(Command, key="ticket_id", returns=Decision):
    ticket_id: str


class TicketOpened(Event, key="ticket_id"):
    ticket_id: str
    title: str


class TicketAssigned(Event, key="ticket_id"):
    ticket_id: str
    agent: str
    previous: str | None


class TicketClosed(Event, key="ticket_id"):
    ticket_id: str
    agent: str | None


UNASSIGNED = "(unassigned)"  # the lanes that are not an agent's: no agent has a name in parentheses
CLOSED = "(closed)"


class JoinLane(Command, key="lane"):
    """dashboard -> dashboard: a ticket enters a lane (an agent's, unassigned or closed)."""

    lane: str
    ticket_id: str
    title: str


class LeaveLane(Command, key="lane"):
    """dashboard -> dashboard: a ticket leaves a lane."""

    lane: str
    ticket_id: str


class Row(msgspec.Struct, frozen=True):
    ticket_id: str
    title: str


class GetWorkload(Query, key="agent", returns=list[Row]):
    """The open tickets assigned to an agent, oldest first (the agent's lane)."""

    agent: str


class LaneView(msgspec.Struct, frozen=True):
    lane: str
    rows: list[Row]
    answered_by: str  # the dashboard instance that holds the lane


class GetLane(Query, key="lane", returns=LaneView):
    """Any lane: an agent's, UNASSIGNED or CLOSED (the team lead counts tickets with these)."""

    lane: str
