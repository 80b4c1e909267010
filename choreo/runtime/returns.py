"""What comes back to a node for what it sent: acks of its envelopes, answers to its requests.

``ACK`` frames (and the acks that ride on ``DATA`` and ``REPLY`` frames) free the credit of the
sender's out-channel, release the per-key holds waiting on it, and let handlers blocked on
credit go on. ``REPLY`` frames resolve the callers waiting in :class:`~choreo.runtime.calls.Calls`,
then apply the ack they carry: after the answers, so that the ack never finds their commands
unanswered (a command acked and unanswered is sent again).

When an answer woke a caller, that caller runs first: its task was scheduled as its future was
resolved, the ack is applied by a callback scheduled after it, and :meth:`Returns.on_replies`
says so (True) to the reader, which stops reading there (``ZmqTransport._readable``) and reads on
after both. A round trip's answer thus reaches its caller before the bookkeeping of its ack, a
look at the socket and the flush::

    returns = Returns(outbox, membership, holds, router, calls, dispatcher, clock=clock, refused=count)
    returns.loop = asyncio.get_running_loop()
    woke = returns.on_replies(sender, frame, flags)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .. import core, wire
from ..errors import ProtocolError
from .calls import Calls
from .dispatch import Dispatcher
from .holds import Holds
from .membership import Membership
from .outbox import Outbox
from .routing import Router

log = logging.getLogger("choreo.engine")


class Returns:
    """Acks and answers that come back to this node (see the module docstring)."""

    def __init__(
        self,
        outbox: Outbox,
        membership: Membership,
        holds: Holds,
        router: Router,
        calls: Calls,
        dispatcher: Dispatcher,  # (pumped when credit comes back: handlers may wait for it)
        *,
        clock: Callable[[], float],
        refused: Callable[[str, str], None],
    ) -> None:
        self.outbox = outbox
        self.membership = membership
        self.holds = holds
        self.router = router
        self.calls = calls
        self.dispatcher = dispatcher
        self.clock = clock
        self.refused = refused
        self.loop: asyncio.AbstractEventLoop | None = None  # (set when the node starts)
        self._late: list[tuple[int, bytes, int]] = []  # acks applied once the callers they follow ran

    def on_replies(
        self, sender: int, data: bytes, flags: int, identity: bytes | None = None, principal: str | None = None
    ) -> bool:
        """A REPLY frame: the answers, then the ack it carries; True if an answer woke a caller."""
        ack_at, ack_len, body_at = wire.split_ack(data, flags)
        peer = self.membership.peers.get(sender)
        woke = False
        for msg_id, type_name, payload in wire.parse_replies(data, body_at):
            try:
                if self.calls.on_reply(msg_id, type_name, payload, peer):
                    woke = True
            except ProtocolError as exc:  # this answer only: the frame's others (and its ack) still count
                self.refused(exc.reason, exc.detail)
        if ack_len:
            ack = (sender, data[: ack_at + ack_len], ack_at)
            if woke and self.loop is not None:  # after the callers it woke, before anything else is read
                if not self._late:
                    self.loop.call_soon(self._apply_late)
                self._late.append(ack)
            else:
                self.on_ack(*ack)
        return woke

    def on_ack_frame(
        self, sender: int, data: bytes, flags: int, identity: bytes | None = None, principal: str | None = None
    ) -> None:
        self.on_ack(sender, data, wire.HEADER_SIZE, bool(flags & wire.FLAG_KEEP))  # (copies to keep listed first)

    def on_release(
        self, sender: int, data: bytes, flags: int, identity: bytes | None = None, principal: str | None = None
    ) -> None:
        """A RELEASE frame: copies we kept for that receiver (see :data:`~choreo.wire.FLAG_KEEP`) may go."""
        body = wire.decode_control(wire.RELEASE, data)
        ch = self.outbox.out.get(sender)
        if ch is not None:
            ch.release(body.ids)
            if self.holds.by_key:  # a copy its receiver had not run may have held one (see Holds)
                self.router.release_holds(self.holds.release(ch))

    def on_ack(self, sender: int, data: bytes, offset: int, listed: bool = False) -> None:
        """The ack at ``offset`` in ``data``, from ``sender``: ProtocolError if it is malformed."""
        ch = self.outbox.out.get(sender)
        if ch is None:
            return  # an ack for a channel we no longer have: harmless
        now = self.clock()
        self.membership.heard(sender, now)
        try:
            ch.on_ack(data, offset, now, listed)
        except core.MalformedFrame as exc:
            raise ProtocolError("malformed", f"ack from {ch.peer.node}: {exc}") from None
        if self.holds.by_key:
            self.router.release_holds(self.holds.release(ch))
        if ch.window.pending:
            self.outbox.dirty_out[ch] = None
        self.dispatcher.pump()

    def _apply_late(self) -> None:
        """The acks left for after the callers their answers woke, applied as a frame's would be
        (a malformed one counted, nothing raises); what they let go (a backlog, held messages)
        leaves with a flush."""
        acks, self._late = self._late, []
        for sender, data, offset in acks:
            try:
                self.on_ack(sender, data, offset)
            except ProtocolError as exc:
                self.refused(exc.reason, exc.detail)
            except Exception as exc:  # a bug: counted and logged, never out of the loop's callback
                self.refused("internal_error", f"{type(exc).__name__} applying an ack: {exc}")
                log.debug("internal error applying an ack", exc_info=True)
        if self.outbox.dirty_out:
            self.outbox.schedule_flush()
