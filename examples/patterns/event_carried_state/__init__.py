"""Event-carried state transfer: events carry the new state, so consumers keep their own copy.

    choreo up examples/patterns/event_carried_state
"""

from .crm import drive

SYSTEM = {"customers": 1, "billing": 1}
CLIENT = "crm"
