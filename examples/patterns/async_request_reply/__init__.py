"""Asynchronous request-reply: accept the request at once, deliver the answer when it is ready.

    choreo up examples/patterns/async_request_reply
"""

from .portal import drive

SYSTEM = {"quotes": 1, "pricing": 2}
CLIENT = "portal"
