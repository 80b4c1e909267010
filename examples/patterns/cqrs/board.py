"""board, the write side: validates commands against the rules, records, announces the outcome.

It keeps only what its rules need (each ticket's state and agent) and answers no queries.
"""

from choreo import Service

from .messages import AssignTicket, CloseTicket, Decision, OpenTicket, TicketAssigned, TicketClosed, TicketOpened

board = Service("board")

_tickets: dict[str, dict] = {}  # ticket id -> {"closed": bool, "agent": str | None}


@board.command(OpenTicket, emits=[TicketOpened])
def open_ticket(cmd: OpenTicket, ctx) -> Decision:
    if cmd.ticket_id in _tickets:
        return Decision(False, f"{cmd.ticket_id} exists already")
    _tickets[cmd.ticket_id] = {"closed": False, "agent": None}
    ctx.emit(TicketOpened(cmd.ticket_id, cmd.title))
    return Decision(True)


@board.command(AssignTicket, emits=[TicketAssigned])
def assign(cmd: AssignTicket, ctx) -> Decision:
    ticket = _tickets.get(cmd.ticket_id)
    if ticket is None or ticket["closed"]:
        return Decision(False, f"{cmd.ticket_id} is {'closed' if ticket else 'unknown'}")
    if ticket["agent"] == cmd.agent:
        return Decision(False, f"{cmd.ticket_id} is already {cmd.agent}'s")
    previous, ticket["agent"] = ticket["agent"], cmd.agent
    ctx.emit(TicketAssigned(cmd.ticket_id, cmd.agent, previous))
    return Decision(True)


@board.command(CloseTicket, emits=[TicketClosed])
def close(cmd: CloseTicket, ctx) -> Decision:
    ticket = _tickets.get(cmd.ticket_id)
    if ticket is None or ticket["closed"]:
        return Decision(False, f"{cmd.ticket_id} is {'closed already' if ticket else 'unknown'}")
    ticket["closed"] = True
    ctx.emit(TicketClosed(cmd.ticket_id, ticket["agent"]))
    return Decision(True)
