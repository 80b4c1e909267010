"""audit: only needs the fact (who changed, which change); it never calls back."""

from choreo import Service

from .messages import AddressChanged, GetTrail

audit = Service("audit")

_trail: list[str] = []


@audit.on(AddressChanged)
def record(event: AddressChanged) -> None:
    _trail.append(f"{event.customer_id}/{event.change_id}")


@audit.query(GetTrail)
def get_trail(query: GetTrail) -> list[str]:
    return list(_trail)
