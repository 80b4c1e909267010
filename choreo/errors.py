"""Exceptions, in two families.

*You used choreo wrongly*: :class:`ChoreoUsageError` (a subclass of ``ValueError``) and the
plain ``TypeError``/``ValueError`` raised by argument checks. *Something outside went wrong*:
:class:`ProtocolError` (a peer sent something invalid; the node counts it, logs it and keeps
serving), :class:`Backpressure`, :class:`DeliveryTimeout`, :class:`NoOwner`,
:class:`HandlerFailed`, :class:`StoreError` (a durable node cannot write its data dir).
A data dir that cannot be used (another node's, corrupt, in use) is :class:`DataDirError`, a
usage error. Every message says what happened and, where there is one, the fix.
"""

from __future__ import annotations

__all__ = [
    "ChoreoError",
    "ChoreoUsageError",
    "UndeclaredMessage",
    "ProtocolError",
    "Backpressure",
    "DeliveryTimeout",
    "NoOwner",
    "HandlerFailed",
    "MessageTooLarge",
    "ValidationError",
    "NotJoined",
    "Undeliverable",
    "NotAllowed",
    "DataDirError",
    "StoreError",
    "StoreFull",
]


class ChoreoError(Exception):
    """Base class of every error choreo raises on purpose."""


class ChoreoUsageError(ChoreoError, ValueError):
    """choreo was used in a way it does not support; the message says how to fix it."""


class UndeclaredMessage(ChoreoUsageError):
    """A handler (or a service outside its handlers) emitted or sent a type it did not declare.

    Declarations are the source of truth for routing and for the analyzer's flow graph, so an
    undeclared emit is refused instead of becoming an invisible edge.
    """


class ValidationError(ChoreoError, ValueError):
    """A message body does not match its declared type (missing field, wrong type...)."""


class MessageTooLarge(ChoreoError, ValueError):
    """A message is larger than the configured limit (``max_message_bytes``)."""


class ProtocolError(ChoreoError):
    """A peer sent bytes that do not follow the choreo protocol.

    ``reason`` is a short stable token (``"malformed"``, ``"version"``, ``"unknown_type"``,
    ``"oversized"``, ...) used as the counter label in the node's statistics.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Backpressure(ChoreoError):
    """Credit towards a receiver is exhausted: the receiver is slower than its producers.

    Raised at once by the non-waiting variants (``try_emit``), and by ``await emit()`` /
    ``await send()`` / ``await emit_many()`` once their timeout expires (for ``emit_many``,
    ``emitted`` holds the ids of the events that went before: they are not withdrawn). The
    message carries the numbers::

        window 1000/1000 in flight to payments#2 for 5.0 s
    """

    def __init__(
        self,
        destination: str,
        in_flight: int,
        window: int,
        waited: float,
        in_flight_bytes: int = 0,
        reason: str | None = None,
    ) -> None:
        self.destination = destination
        self.in_flight = in_flight
        self.window = window
        self.waited = waited
        self.in_flight_bytes = in_flight_bytes
        # emit_many: the ids of the events of the batch that went before credit ran out (not withdrawn)
        self.emitted: list[bytes] = []
        super().__init__(
            reason
            or f"window {in_flight}/{window} in flight to {destination} for {waited:.1f} s "
            f"({in_flight_bytes} bytes unacknowledged): the receiver is not keeping up; "
            "slow the producer, add instances of the receiving service, or raise the timeout"
        )

    @classmethod
    def unavailable(cls, service: str, waited: float, waiting: int = 0) -> Backpressure:
        """No instance of ``service`` is reachable (they died, left or are cut off) and the
        messages waiting for one at this node fill their room (a window's worth)."""
        return cls(
            service, waiting, waiting, waited,
            reason=f"no live instance of {service} for {waited:.1f} s and {waiting} messages already wait for one "
            "here (the most this node keeps for a service: its window): its instances died, left or are "
            "unreachable; everything waiting leaves when one is back (start one, or raise the timeout)",
        )


class DeliveryTimeout(ChoreoError, TimeoutError):
    """A command or query got no answer within its timeout (or a confirmed event no acknowledgement)."""


class NotJoined(ChoreoError, TimeoutError):
    """The node has not joined the mesh (its seeds do not answer), so it cannot route yet.

    A node routes nothing until it has joined: ``emit``/``send``/``ask`` wait for it up to their
    timeout, then raise this, naming the seeds that did not answer.
    """


class NodeStopped(ChoreoError, RuntimeError):
    """The node has stopped (``stop()`` or ``kill()``): it emits, sends and asks nothing more.

    Every verb called after that raises it at once, and every caller still waiting on the node
    (for an answer, for credit, to join, on ``flush`` or ``wait_for``) gets it the moment the
    node stops: nothing ticks any more to answer or time them out. A new ``Node`` takes its place.
    """


class NotAllowed(ChoreoError, PermissionError):
    """The mesh's keys do not allow this: a key that may not originate a message type, call a
    system query, or serve a service. The message names the key and what it may do instead."""


class Undeliverable(ChoreoError):
    """A message reached no one: no service in the mesh declares that it consumes its type."""


class NoOwner(ChoreoError, LookupError):
    """No live service in the mesh handles this command or query type."""


class HandlerFailed(ChoreoError):
    """The remote handler of a command or query raised (after its retries, for commands).

    ``remote_type`` and ``remote_message`` describe the exception on the handling node.
    """

    def __init__(self, message_type: str, service: str, remote_type: str, remote_message: str) -> None:
        self.message_type = message_type
        self.service = service
        self.remote_type = remote_type
        self.remote_message = remote_message
        super().__init__(f"{service} failed to handle {message_type}: {remote_type}: {remote_message}")


class DataDirError(ChoreoUsageError):
    """A durable node's data dir cannot be used: in use by another node, another node's, corrupt,
    not a choreo store, or written by a newer choreo. Nothing in it was changed::

        data dir /var/lib/orders is in use by another node (pid 4242): one node per data dir
    """


class StoreError(ChoreoError):
    """A durable node could not commit to its data dir (an I/O error). Until a commit succeeds
    it acknowledges nothing and ``emit`` waits: what is not committed is never reported safe."""


class StoreFull(StoreError, Backpressure):
    """The disk of a durable node's data dir is full: backpressure until space frees.

    The node keeps serving what it can without writing: it holds its acknowledgements (so its
    producers slow down and wait) and ``emit`` waits, then raises this; the store is never left
    half written, and everything resumes once space frees.
    """

    def __init__(self, path: str, detail: str, waited: float = 0.0) -> None:
        Backpressure.__init__(
            self, path, 0, 0, waited,
            reason=f"data dir {path}: the disk is full ({detail}); this node holds its acknowledgements and emits "
            "until a commit succeeds again: free space there (nothing committed is lost)",
        )
        self.path = path
