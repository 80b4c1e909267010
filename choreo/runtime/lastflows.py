"""The last instance of a service, as it leaves, finishes the flows it is part of.

Peers send nothing new to an instance that leaves: its partitions move to the other instances,
and with none left, what is meant for the service waits at its producers for the next one. But
a flow that comes back to the service (A -> B -> A: a saga's step, the shop's stock reservation)
is not new work. The leaver's messages of that flow wait for its last step's ack, which would
wait for the next instance, which the leaver's drain waits for in turn: only ``drain_timeout``
ended it, and then what the leaver still had in progress was taken back and ran again there.

So while it drains with no other instance of its service up, the leaver tells every peer, and
itself, the flows (trace ids: every output carries its input's) it still has messages of in
progress or unacknowledged downstream (:class:`~choreo.wire.Flows`, again every ``rto``, an
empty list once none are left), and what of those flows waits for its service goes to it
(:meth:`Outbox.flows_of <choreo.runtime.outbox.Outbox.flows_of>`); anything else keeps waiting
for the next instance. Only an instance of the service named, and one that leaves, is heard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .. import core, wire
from ..config import NodeConfig
from ..errors import ProtocolError
from .dispatch import Dispatcher
from .membership import Membership
from .outbox import Outbox

__all__ = ["LastFlows"]


class LastFlows:
    """A leaving last instance's half (:meth:`tick`) and every node's (:meth:`on_frame`)."""

    def __init__(
        self, service: str | None, membership: Membership, outbox: Outbox, dispatcher: Dispatcher, *,
        config: NodeConfig, incarnation: Callable[[], int],
    ) -> None:
        self.service = service
        self.membership = membership
        self.outbox = outbox
        self.dispatcher = dispatcher
        self.config = config
        self.incarnation = incarnation  # (a node that rejoins gets a new one)
        self._due = 0.0
        self._told = False

    def tick(self, now: float) -> None:
        """Leaving: tell every peer, and ourselves, the flows we still work on (see the module
        docstring); nothing while another instance of our service is up (our partitions move)."""
        if self.service is None or now < self._due:
            return
        self._due = now + self.config.rto
        traces: frozenset[bytes] = frozenset()
        if not self.membership.instances(self.service):
            traces = frozenset(self.in_progress())
        if not traces and not self._told:
            return
        self._told = bool(traces)
        me = self.incarnation()
        own = self.membership.peers.get(me)
        if own is not None:
            self.outbox.flows_of(self.service, own, traces)
        body = wire.Flows(self.service, sorted(traces))
        for peer in self.membership.live_peers():
            if peer.incarnation != me:
                self.outbox.send(peer.endpoint, wire.encode_control(wire.FLOWS, me, peer.incarnation, body))

    def in_progress(self) -> Iterator[bytes]:
        """The traces of what we still work on: messages in progress, and what we sent and is
        not yet acknowledged (a durable node's handlers are done once their outputs are stored)."""
        for job in self.dispatcher.in_progress.values():
            yield job.env.trace_id
        for ch in self.outbox.live_channels():
            if ch.window.in_flight:
                for env in core.parse_envelopes(b"".join(ch.window.unacked())):
                    yield env.trace_id
            for item in ch.backlog:
                yield item.trace_id

    def on_frame(
        self, sender: int, data: bytes, flags: int, identity: bytes | None = None, principal: str | None = None
    ) -> None:
        """A FLOWS frame: only an instance of the service it names, one that leaves, is heard."""
        body = wire.decode_control(wire.FLOWS, data)
        peer = self.membership.peers.get(sender)
        if peer is None or peer.service is None or peer.service.name != body.service:
            raise ProtocolError("malformed", f"flows of {body.service!r} from a node that is not its instance")
        if peer.state != "leaving":
            return  # (we have not heard that it leaves yet: it tells us again)
        self.outbox.flows_of(body.service, peer, frozenset(body.traces))
