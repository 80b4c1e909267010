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


class Row(msgspec.Struct, frozen=True):
    ticket_id: str
    title: str


class GetWorkload(Query, returns=list[Row]):
    """The open tickets assigned to an agent, oldest first."""

    agent: str


class Counts(msgspec.Struct, frozen=True):
    unassigned: int
    assigned: int
    closed: int
    answered_by: str


class GetCounts(Query, returns=Counts):
    pass
