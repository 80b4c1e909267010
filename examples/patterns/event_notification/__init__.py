"""Event notification: tell others that something happened, and let them ask for the details.

    choreo up examples/patterns/event_notification
"""

from .support import drive

SYSTEM = {"customers": 1, "shipping": 1, "audit": 1}
CLIENT = "support"
