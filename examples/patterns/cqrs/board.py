"""board, the write side: validates commands against the rules, records, announces the outcome.

It keeps only what its rules need, each ticket's :class:`Ticket` in ``ctx.state`` under the
ticket's key (every command is keyed by the ticket), and answers no queries.
"""

import msgspec

from choreo import Service

from .messages import AssignTicket, CloseTicket, Decision, OpenTicket, TicketAssigned, TicketClosed, TicketOpened


class Ticket(msgspec.Struct, frozen=True):
    closed: bool = False
    agent: str | None = None


board = Service("board", state=[Ticket], replicas=1)


@board.command(OpenTicket, emits=[TicketOpened])
def open_ticket(cmd: OpenTicket, ctx) -> Decision:
    if ctx.state.get(Ticket) is not None:
        return Decision(False, f"{cmd.ticket_id} exists already")
    ctx.state.put(Ticket())
    ctx.emit(TicketOpened(cmd.ticket_id, cmd.title))
    return Decision(True)


@board.command(AssignTicket, emits=[TicketAssigned])
def assign(cmd: AssignTicket, ctx) -> Decision:
    ticket = ctx.state.get(Ticket)
    if ticket is None or ticket.closed:
        return Decision(False, f"{cmd.ticket_id} is {'closed' if ticket else 'unknown'}")
    if ticket.agent == cmd.agent:
        return Decision(False, f"{cmd.ticket_id} is already {cmd.agent}'s")
    ctx.state.put(Ticket(agent=cmd.agent))
    ctx.emit(TicketAssigned(cmd.ticket_id, cmd.agent, ticket.agent))
    return Decision(True)


@board.command(CloseTicket, emits=[TicketClosed])
def close(cmd: CloseTicket, ctx) -> Decision:
    ticket = ctx.state.get(Ticket)
    if ticket is None or ticket.closed:
        return Decision(False, f"{cmd.ticket_id} is {'closed already' if ticket else 'unknown'}")
    ctx.state.put(Ticket(closed=True, agent=ticket.agent))
    ctx.emit(TicketClosed(cmd.ticket_id, ticket.agent))
    return Decision(True)
