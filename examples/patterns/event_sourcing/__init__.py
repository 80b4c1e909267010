"""Event sourcing: a service keeps each account as its log of events, and folds it into a balance.

    choreo up examples/patterns/event_sourcing
"""

from .teller import drive

SYSTEM = {"accounts": 2}
CLIENT = "teller"
