"""Relief of a channel whose credit is held by messages that wait for what must come over it.

A message is acknowledged once its handler's outputs are (or, on a durable node, once they are
stored), so until then it holds a slot of its channel's span: its sender has no credit beyond
the oldest message not done. When what those messages wait for has to come back over that same
channel, behind them, neither side can move. The fault schedules met three shapes of it
(``tests/sim/test_nemesis.py``, the saga workload):

* two instances, each the other's standby: each one's messages from the other wait for the
  standby's ack of their writes, whose delta waits in the other direction's backlog, behind
  messages that wait for the same (replicas 21);
* a message forwarded instance -> instance is a duplicate of one its producer had also resent
  there; it waits for its original, whose round trip comes back over the same channel, behind
  the forwards (replicas 70 and 113);
* an instance hands partitions to a newcomer while its own handlers' outputs for them go to the
  newcomer, which keeps them unacknowledged until the hand-over is in; the hand-over's chunks wait
  behind them (durable+replicas 106 and 186).

A node whose inbound channel has had half a window or more unfinished, its cumulative ack
unchanged, for ``rto`` (:meth:`InChannel.stalled <choreo.runtime.channels.InChannel.stalled>`),
acknowledges the messages of that channel that ran and wait for their outputs, or wait for their
partition's hand-over, asking the sender to keep a copy of each (``FLAG_KEEP``, the mechanism of a
message handed over running: :meth:`OutChannel.keep <choreo.runtime.channels.OutChannel.keep>`).
The sender gets its credit back; the copies go when those messages are done (a ``RELEASE``, and
every later ack no longer lists them), and are sent again to the partitions' next owners should
this node die or leave first. Only then are they done for the sender too (what it acknowledges
upstream waits for that): a copy is no safer than the node that holds it.

Not while this node's outputs wait for a service with no instance: what they wait for is on no
channel, and the backpressure that holds their inputs back is the point (relieving them would only
pile more work here). Events only: a command's caller hears its answer ahead of its ack. On a
durable node, only messages whose id is in its journal: restarted, it knows they ran. At most
``KEEP_MAX`` per channel at a time.
"""

from __future__ import annotations

import logging
from operator import itemgetter

from ..wire import KIND_EVENT
from .channels import InChannel
from .context import Job
from .dispatch import Dispatcher
from .outbox import Outbox

__all__ = ["KEEP_MAX", "Relief"]

log = logging.getLogger("choreo.dispatch")

# messages acknowledged ahead of their time on one channel, at most: every ACK frame lists them
KEEP_MAX = 1024


class Relief:
    """Watches a node's inbound channels and relieves the stalled ones (see the module docstring)."""

    def __init__(self, dispatcher: Dispatcher, outbox: Outbox, after: float) -> None:
        self.dispatcher = dispatcher
        self.outbox = outbox
        self.after = after  # how long a channel stays stalled before it is relieved (rto)

    def tick(self, now: float) -> None:
        if self.outbox.waiting:
            return  # outputs wait for a service with no instance: backpressure is the point
        for channel in self.outbox.inbound.values():
            if channel.stalled(now, self.after):
                self.relieve(channel)

    def relieve(self, channel: InChannel) -> int:
        """Acknowledge what ``channel`` brought that ran and waits for its outputs' acks, or waits
        for its partition's hand-over, its sender keeping a copy of each; returns how many."""
        room = KEEP_MAX - len(channel.keep)
        if room <= 0:
            return 0
        dispatcher = self.dispatcher
        waiting: list[tuple[int, Job | None]] = []  # (seq, its job: None for an arrival not run yet)
        for job in dispatcher.in_progress.values():
            # ran (its outputs are out); on a durable node, with its id in the journal (the ack
            # that covers it leaves once that commit is safe)
            if job.pending and not job.holds_key and job.env.kind == KIND_EVENT and (job.logged or not channel.durable):
                waiting.extend((j.env.seq, j) for j in (job, *job.duplicates) if j.channel is channel and j.kept is None)
        if dispatcher.moves is not None:  # arrivals buffered until their partition's hand-over is in: the
            for queue in dispatcher.moves.ownership.buffered.values():  # job made when one runs finds its seq kept
                waiting.extend((env.seq, None) for ch, env, _ in queue
                               if ch is channel and env.kind == KIND_EVENT and env.seq not in channel.keep)
        waiting.sort(key=itemgetter(0))
        relieved = waiting[:room]
        for seq, job in relieved:
            # (first: the ack that covers it lists it; a job ran, an arrival did not: a hold of its
            # sender's waits for the latter, see Holds)
            self.outbox.keep(channel, seq, ran=job is not None)
            if job is not None:
                job.kept = [(channel, seq)]
            channel.reorder.complete(seq)
        if relieved:
            dispatcher.stats.relieved += len(relieved)
            self.outbox.ack_later(channel)
            log.info("%s: %d message(s) from %s held its credit, waiting for their outputs' acks or their "
                     "partition's hand-over: acknowledged, their sender keeping copies until they are done",
                     dispatcher.host.name, len(relieved), channel.peer.node)
        return len(relieved)

