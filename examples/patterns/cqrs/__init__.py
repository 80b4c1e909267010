"""CQRS: one model for the commands (the board's rules), another for the queries (the dashboard).

    choreo up examples/patterns/cqrs
"""

from .helpdesk import drive

SYSTEM = {"board": 1, "dashboard": 2}
CLIENT = "helpdesk"
