"""dashboard, the read side: views shaped for the questions asked, built from the board's events.

Every instance subscribes with ``broadcast=True``, so every instance holds the whole read model
and any one can answer any query: the read side scales by adding replicas, independently of the
write side. Queries are not keyed, so each goes to the least loaded replica.
"""

from choreo import Service

from .messages import Counts, GetCounts, GetWorkload, Row, TicketAssigned, TicketClosed, TicketOpened

dashboard = Service("dashboard")

_titles: dict[str, str] = {}
_workload: dict[str, dict[str, Row]] = {}  # agent -> open tickets (insertion order: oldest first)
_unassigned: set[str] = set()
_closed: set[str] = set()


@dashboard.on(TicketOpened, broadcast=True)
def opened(event: TicketOpened) -> None:
    _titles[event.ticket_id] = event.title
    _unassigned.add(event.ticket_id)


@dashboard.on(TicketAssigned, broadcast=True)
def assigned(event: TicketAssigned) -> None:
    _unassigned.discard(event.ticket_id)
    if event.previous is not None:
        _workload.get(event.previous, {}).pop(event.ticket_id, None)
    _workload.setdefault(event.agent, {})[event.ticket_id] = Row(event.ticket_id, _titles[event.ticket_id])


@dashboard.on(TicketClosed, broadcast=True)
def closed(event: TicketClosed) -> None:
    _unassigned.discard(event.ticket_id)
    if event.agent is not None:
        _workload.get(event.agent, {}).pop(event.ticket_id, None)
    _closed.add(event.ticket_id)


@dashboard.query(GetWorkload)
def workload(query: GetWorkload) -> list[Row]:
    return list(_workload.get(query.agent, {}).values())


@dashboard.query(GetCounts)
def counts(query: GetCounts, ctx) -> Counts:
    return Counts(len(_unassigned), sum(len(w) for w in _workload.values()), len(_closed), ctx.instance)
