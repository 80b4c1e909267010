"""Event sourcing: a service keeps its state as a log of events and rebuilds it after a restart.

    choreo up examples/patterns/event_sourcing
"""

from .teller import drive

SYSTEM = {"accounts": 1}
CLIENT = "teller"
