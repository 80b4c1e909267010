"""Received data on its way to the handlers: in order, commands first, in turns of the loop.

A ``DATA`` frame goes through its sender's in-channel, which releases its envelopes in sequence
order (the core's reorder buffer). Commands and queries in a frame flagged urgent are handled as
the frame is read, and their answers leave at once: they wait neither for the rest of the read
nor behind the events queued here. Everything else queues, and is handled in turns of the event
loop: at most ``RUN_BUDGET`` envelopes a turn, so that under overload the node keeps answering
heartbeats, and a look for frames waiting to be read every ``RUN_CHUNK`` envelopes, so that a
command that arrives during a long run of events waits for at most that many handlers.

What waits here is the node's measurable lag (:meth:`Intake.lag`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

from .. import core, wire
from ..config import NodeConfig
from ..errors import ProtocolError
from .admission import Admission
from .channels import InChannel
from .dispatch import Dispatcher
from .membership import Membership
from .outbox import Outbox

__all__ = ["Intake", "RUN_BUDGET", "RUN_CHUNK"]

RUN_BUDGET = 512  # envelopes handled per turn of the event loop
RUN_CHUNK = 64  # envelopes handled between two looks for frames waiting to be read
_URGENT_KINDS = (wire.KIND_COMMAND, wire.KIND_QUERY)


class Intake:
    """The receive path of ``DATA`` frames (see the module docstring)."""

    def __init__(
        self,
        outbox: Outbox,
        membership: Membership,
        admission: Admission,
        dispatcher: Dispatcher,
        *,
        config: NodeConfig,
        clock: Callable[[], float],
        refused: Callable[[str, str], None],
        on_ack: Callable[[int, bytes, int], None],
        input_waiting: Callable[[], bool] | None = None,
    ) -> None:
        """``on_ack`` takes an ack piggybacked on a frame (sender, frame, offset);
        ``input_waiting`` says whether frames wait to be read, and has them read next (None: the
        transport cannot tell, and a turn runs its whole budget)."""
        self.outbox = outbox
        self.membership = membership
        self.admission = admission
        self.dispatcher = dispatcher
        self.clock = clock
        self.refused = refused
        self.on_ack = on_ack
        # the largest envelope taken: the largest message, with its header, type and key
        self.envelope_limit = config.max_message_bytes + core.HEADER_SIZE + 255 + 65535
        self.input_waiting = input_waiting or (lambda: False)
        self.loop: asyncio.AbstractEventLoop | None = None  # (set when the node starts)
        self.received = clock()  # when the batch being handled arrived (the spans' clock)
        self.queue: deque[tuple[InChannel, list[Any], float]] = deque()
        self._scheduled = False

    def on_data(
        self, sender: int, data: bytes, flags: int = 0, identity: bytes | None = None, principal: str | None = None
    ) -> None:
        """One ``DATA`` frame (the engine's frame table calls it)."""
        ack_at, ack_len, body_at = wire.split_ack(data, flags)
        if ack_len:
            self.on_ack(sender, data[: ack_at + ack_len], ack_at)
        outbox = self.outbox
        ch = outbox.inbound.get(sender)
        if ch is None:
            peer = self.membership.peers.get(sender)
            if peer is None or not peer.live:
                raise ProtocolError("unknown_peer", f"data from {sender:016x}, which never said hello")
            ch = outbox.inbound_from(peer)
        now = self.clock()
        self.membership.heard(sender, now)
        try:
            released = ch.reorder.feed(data, body_at)
        except core.MalformedFrame as exc:
            raise ProtocolError("malformed", f"data frame from {ch.peer.node}: {exc}") from None
        self.received = now
        if released and self.admission.secure:
            released = self.admission.rightful(ch, released, self.dispatcher.refuse)
        if released and len(data) - body_at > self.envelope_limit:  # only then can one be too large
            released = self._within_limit(ch, released)
        if released and flags & wire.FLAG_URGENT:
            # commands or queries: handled now, ahead of every event queued here (from this sender
            # or any other), and answered now; the frame's events queue as usual (a hand-over
            # stays in order: it must follow the events its old owner sent before it)
            urgent = [env for env in released if env.kind in _URGENT_KINDS]
            if urgent:
                released = [env for env in released if env.kind not in _URGENT_KINDS] if len(urgent) < len(released) else []
                dispatcher = self.dispatcher
                dispatcher.held_results.hold()  # kept once the answers left: the callers wait on those
                try:
                    dispatcher.deliver_batch(ch, urgent, now)
                    dispatcher.pump()
                    outbox.send_replies()
                finally:
                    dispatcher.held_results.release()
        if released:
            self.queue.append((ch, released, now))
            if not self._scheduled and self.loop is not None:
                self._scheduled = True
                outbox.hold_acks = True  # one ack after the handlers (see Outbox.flush)
                self.loop.call_soon(self.run)
        if ch.reorder.ack_pending:
            outbox.ack_later(ch)

    def _within_limit(self, ch: InChannel, released: list[Any]) -> list[Any]:
        """``released`` without the envelopes above the limit (refused, counted, completed)."""
        limit = self.envelope_limit
        kept = []
        for env in released:
            if env.size > limit:
                self.refused("oversized", f"{env.type} envelope of {env.size} bytes from {ch.peer.node}")
                ch.reorder.complete(env.seq)
            else:
                kept.append(env)
        return kept

    def run(self) -> None:
        """Hand queued envelopes to their handlers: one turn (see the module docstring)."""
        self._scheduled = False
        queue = self.queue
        budget, chunk = RUN_BUDGET, RUN_CHUNK
        now = self.clock()
        deliver_batch = self.dispatcher.deliver_batch
        while queue and budget > 0:
            ch, envs, received = queue.popleft()
            if ch.closed:
                continue  # its sender is gone and resends these to their owners elsewhere
            if len(envs) > chunk:  # the rest goes first next time: order is kept
                queue.appendleft((ch, envs[chunk:], received))
                envs = envs[:chunk]
            self.received = received
            deliver_batch(ch, envs, now)
            budget -= len(envs)
            chunk -= len(envs)
            if chunk <= 0:
                if self.input_waiting():
                    break  # (their read is scheduled ahead of the next turn)
                chunk = RUN_CHUNK
        self.dispatcher.pump()
        if queue and self.loop is not None:
            self._scheduled = True
            self.loop.call_soon(self.run)
        else:
            self.outbox.hold_acks = False
        self.outbox.flush()

    def lag(self, lag: dict[int, int]) -> dict[int, int]:
        """``lag`` (messages waiting per partition) plus the envelopes queued here."""
        for _, envs, _ in self.queue:
            for env in envs:
                lag[env.partition] = lag.get(env.partition, 0) + 1
        return lag
