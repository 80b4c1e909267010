"""Outputs a node owes for messages another node handled: kept until they are acknowledged.

A message is done once its outputs are acknowledged. Two kinds of message are done at one node
with their outputs known to another, which must send them should the first go:

* an *ungated* message (its flow came back to a key it wrote, see
  :meth:`~choreo.runtime.partdata.PartitionData.ungate`): its writes and outputs reach the
  partition's standby before they are acknowledged, its mark (the id) after;
* a message *handed over running* (see :meth:`~choreo.runtime.partdata.PartitionData.ran`): the
  partition's new owner gets its id and outputs, and a mark once its old owner saw them
  acknowledged; should the old owner go first, the new owner sends them (:meth:`Owed.source_gone`).

Either way the message's id is known here, so its resends are dropped as duplicates: its outputs
are what stands for it. Whoever sends them keeps them until they are acknowledged, and while it
does, its own standby holds them too (:meth:`Owed.sent`): should this node die with them
unacknowledged (they may wait for a service with no instance), the standby takes the partition
over knowing the message as done, and sends them then instead. Each output goes under the id it
had, so wherever it arrived already it is dropped.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable
from functools import partial

import msgspec

from .. import core
from ..errors import ChoreoError
from ..messages import Message, decoder_for, message_options
from ..service import Handler
from .context import Host, Job
from .replicas import Replicas
from .transfer import Delta

__all__ = ["KeyHolds", "Owed"]

log = logging.getLogger("choreo.dispatch")


def nothing() -> None:
    """A shipment whose ack nobody waits for (what it says is made good another way)."""


HELD = object()  # a key's item in progress while it is held (see KeyHolds): no job


class KeyHolds:
    """The keys in progress here (``core.KeyedDispatch``), and those held for a previous
    owner's outputs.

    A message handed over running ran at its partition's previous owner, whose outputs for it
    may still be on their way from there (to a receiver that restarts, say). Were this node, the
    new owner, to run the key's next message at once, its outputs could reach their receiver
    first, from another node: the key's order broken one step downstream (a pipeline of two
    services under chaos: a first-stage instance stopped while the second stage restarted, its
    successor's outputs handled before the earlier ones it resent). So the key is held, as if a
    message of it were in progress, until the previous owner marks those outputs acknowledged,
    or goes (this node then sends them itself, ahead of anything the key's next messages emit).
    A message of a flow some hold here waits for (its trace) does not wait: it came back, and
    what is held may wait for it (a saga's step; or another flow's, whose step waits in turn
    behind that flow's hold at another key: saga replicas 87004 wedged when only a key's own
    flows passed). Flows can still wait for each other across nodes, so a hold lasts ``timeout``
    at most (see :class:`~choreo.runtime.dispatch.Dispatcher`): long enough for a receiver to be
    found dead and replaced, after which the key runs on, its order no longer kept. That bound
    runs only while every service the held outputs go to has a live instance here: without one,
    nothing waits on a flow a hold could be part of, and what the key emitted next would wait for
    the same receivers (a pipeline's second stage with no instance for 32 s, chaos seed 109: its
    first stage's new owner ran on after 14 s, and those later outputs went out first)."""

    def __init__(self, keyed: core.KeyedDispatch, ready: deque[Job], pump: Callable[[], None], host: Host,
                 timeout: float, who: str) -> None:
        self.keyed = keyed
        self.ready = ready
        self.pump = pump
        self.host = host
        self.timeout = timeout
        self.who = who
        self.traces: dict[bytes, dict[bytes, bytes]] = {}  # a held key -> {its held message ids: their traces}
        self.flows: Counter[bytes] = Counter()  # the traces of every held message here
        self.partition_of: dict[bytes, int] = {}  # a held key -> its partition
        self.outputs: dict[bytes, set[str]] = {}  # a held key -> the types of the outputs it waits for

    def next(self, key: bytes) -> None:
        """The job in progress for ``key`` is over: its next one (if any) is ready to start."""
        nxt = self.keyed.done(key)
        if nxt is not None:
            nxt.holds_key = True
            self.ready.append(nxt)

    def hold(self, partition: int, key: bytes, msg_id: bytes, trace: bytes, outputs: Iterable[str] = ()) -> None:
        """Hold ``key`` until :meth:`release` of ``msg_id``, a message handed over running whose
        outputs are of the types ``outputs``."""
        traces = self.traces.get(key)
        if traces is None:
            if self.keyed.busy(key):  # a job of it in progress here (the partition was not ours: cannot be)
                return
            self.keyed.admit(key, HELD)
            traces = self.traces[key] = {}
            self.partition_of[key] = partition
            self.outputs[key] = set()
            self.host.call_later(self.timeout, partial(self._expire, key, traces, self.host.clock()))
        if msg_id not in traces:
            traces[msg_id] = trace
            self.flows[trace] += 1
            self.outputs[key].update(outputs)

    def release(self, key: bytes, msg_id: bytes) -> None:
        """``msg_id``'s outputs are acknowledged, or sent from here: its key runs on once the last goes."""
        traces = self.traces.get(key)
        trace = traces.pop(msg_id, None) if traces is not None else None
        if trace is None:
            return
        self._forget(trace)
        if not traces:
            self._free(key)
            self.pump()

    def release_partition(self, partition: int) -> list[Job]:
        """``partition`` drains here towards another instance: its held keys are let go, what they
        waited for going to the next owner with the partition. Returns the messages that waited
        behind them, taken out unrun: they go to that owner too, to run there after those. Run
        here, their outputs left ahead of the held ones, which the previous owner sends (to a
        receiver replaced meanwhile, say): chaos pipeline seed 196, the sink handled 49720 before
        47720. (A dead letter's replay has no sender to pass it on for: it runs here, in turn.)"""
        if not self.partition_of:
            return []
        keys = [key for key, p in self.partition_of.items() if p == partition]
        waited = self.keyed.drain_keys(keys)
        for key in keys:
            self._free(key)
        passed: list[Job] = []
        for job in waited:
            if job.channel is not None:
                passed.append(job)
            elif self.keyed.admit(job.env.key, job):  # a replay runs here, in turn (as in :meth:`next`)
                job.holds_key = True
                self.ready.append(job)
        if len(passed) < len(waited):
            self.pump()
        return passed

    def _expire(self, key: bytes, traces: dict[bytes, bytes], since: float, missed: bool = False) -> None:
        """The bound of a hold: ``missed``, a receiver had no instance at the last look."""
        if self.traces.get(key) is not traces:
            return  # (a later hold of the key, or none)
        if any(self.host.receiver_missing(t) for t in self.outputs[key]):  # look again soon
            self.host.call_later(self.timeout / 8, partial(self._expire, key, traces, since, True))
        elif missed:  # the receivers are back: the bound starts again
            self.host.call_later(self.timeout, partial(self._expire, key, traces, since))
        else:
            log.info("%s: key %r waited %.0f s for a previous owner's outputs of %d messages it handed over "
                     "running: runs on (its next outputs may reach their receivers ahead of those)", self.who, key,
                     self.host.clock() - since, len(traces))
            self._free(key)
            self.pump()
            self.host.schedule_flush()  # (a timer's turn: nothing else sends what ran)

    def _free(self, key: bytes) -> None:
        for trace in self.traces.pop(key).values():
            self._forget(trace)
        del self.partition_of[key]
        del self.outputs[key]
        self.next(key)

    def _forget(self, trace: bytes) -> None:
        self.flows[trace] -= 1
        if not self.flows[trace]:
            del self.flows[trace]

    def passes(self, key: bytes, trace: bytes) -> bool:
        """Is ``key`` held, and ``trace`` a flow that a hold here waits for (which must not wait)?"""
        return key in self.traces and trace in self.flows


EARLY_MARKS = 4096  # marks remembered for messages whose hand-over is not in yet (see Owed.marked)


class Owed:
    """The outputs this node owes, by message id (see the module docstring)."""

    def __init__(self, host: Host, handlers: dict[str, Handler], replicas: Replicas | None, who: str) -> None:
        self.host = host
        self.handlers = handlers
        self.replicas = replicas
        self.who = who
        self.deltas: dict[bytes, Delta] = {}  # owed, not sent yet: message id -> its delta
        self.by: dict[bytes, int] = {}  # a new owner's: message id -> the previous owner that marks it
        self.sending: dict[bytes, Delta] = {}  # sent by this node, not all acknowledged yet
        self.sent = 0  # messages whose outputs this node sent for another
        # message id -> what its duplicates wait to do once its outputs sent here are acknowledged (see wait)
        self.waiting: dict[bytes, list[Callable[[], None]]] = {}
        self.holds: KeyHolds | None = None  # the dispatcher's: keys wait for what was handed over running
        self.early_marks: dict[bytes, None] = {}  # marks of messages whose hand-over is not in yet (see marked)

    def __len__(self) -> int:
        """Messages whose outputs are owed here: not sent yet, or sent and not all acknowledged."""
        return len(self.deltas) + len(self.sending)

    def of(self, p: int) -> list[Delta]:
        """What partition ``p`` owes here, sent or not: a hand-over of ``p`` takes it along."""
        return [d for d in (*self.deltas.values(), *self.sending.values()) if d.partition == p]

    def add(self, delta: Delta, by: int | None = None, *, ours: bool = False) -> None:
        """``delta``'s outputs are owed here; ``by``: the live previous owner that marks them done
        (a message handed over running). ``ours``: the partition is this node's (a hand-over,
        not a standby's copy or delta), so its standby holds them too."""
        if by is not None and delta.msg_id in self.early_marks:  # done there already (see marked)
            del self.early_marks[delta.msg_id]
            if ours:
                self._to_standby(delta, marked=True)
            return
        self.deltas[delta.msg_id] = delta
        if by is not None:
            self.by[delta.msg_id] = by
            if ours and self.holds is not None:
                self.holds.hold(delta.partition, delta.key, delta.msg_id, delta.trace_id, (t for t, _ in delta.outputs))
        if ours:
            self._to_standby(delta, marked=False)

    def wait(self, msg_id: bytes, then: Callable[[], None]) -> bool:
        """Call ``then`` once the outputs this node sends for ``msg_id`` are acknowledged (False,
        uncalled: it sends none now).

        A copy of such a message is its duplicate, and is done when they are: acknowledged at
        once, its sender's copy would go while the outputs live only in this node's memory (a
        message handed over running whose old owner died: should this node die too before they
        are acknowledged, the copy is what runs it again, saga plain 195). (Outputs owed and not
        sent here are their previous owner's to send: it marks them, or goes and they are sent.)"""
        if msg_id not in self.sending:
            return False
        self.waiting.setdefault(msg_id, []).append(then)
        return True

    def waiting_in(self, p: int) -> int:
        """Duplicates of partition ``p``'s messages that wait here (:meth:`wait`)."""
        count = 0
        for msg_id, thens in self.waiting.items():
            delta = self.sending.get(msg_id)
            if delta is not None and delta.partition == p:
                count += len(thens)
        return count

    def _sent_no_more(self, msg_id: bytes) -> None:
        if self.waiting and msg_id not in self.sending:
            for then in self.waiting.pop(msg_id, ()):
                then()

    def settle(self, msg_id: bytes) -> None:
        """A standby: its owner's mark for ``msg_id`` came, nothing is owed for it any more."""
        self.deltas.pop(msg_id, None)

    def marked(self, msg_id: bytes) -> bool:
        """A message handed over running is done at its previous owner: nothing is owed for it
        (False: no such message here).

        An unknown one is remembered (the newest :data:`EARLY_MARKS`): the hand-over it went with
        may not be in yet (a stream that waits for this node's view to give it the partition),
        and its mark, on the same channel, came after it. Dropped, the message stayed owed and its
        key held until the previous owner went, its outputs then sent again: to a receiver that
        had lost their ids, they ran twice (chaos pipeline seed 231, four events, 9.5 s later)."""
        if self.by.pop(msg_id, None) is None:
            early = self.early_marks
            early[msg_id] = None
            if len(early) > EARLY_MARKS:
                del early[next(iter(early))]
            return False
        delta = self.deltas.pop(msg_id, None)
        if delta is not None:
            self._to_standby(delta, marked=True)
            self._release(delta)
        return True

    def _release(self, delta: Delta) -> None:
        if self.holds is not None:
            self.holds.release(delta.key, delta.msg_id)

    def source_gone(self, incarnation: int) -> int:
        """A previous owner went before it marked the messages it handed over running: send their
        outputs. Returns how many messages' outputs went."""
        ids = [msg_id for msg_id, by in self.by.items() if by == incarnation]
        for msg_id in ids:
            del self.by[msg_id]
        owed = [self.deltas.pop(msg_id) for msg_id in ids if msg_id in self.deltas]
        sent = self._send(owed)
        for delta in owed:  # (their outputs leave before anything their keys' next messages emit)
            self._release(delta)
        if sent:
            log.info("%s: a previous owner went before its outputs of %d messages it handed over were "
                     "acknowledged: sent them again", self.who, sent)
        return sent

    def take_over(self, p: int) -> int:
        """Partition ``p`` is ours now: send what its last owner had not marked done (it may have
        died before they all arrived). Returns how many messages' outputs went."""
        owed = [d for d in self.deltas.values() if d.partition == p and d.msg_id not in self.by]
        for delta in owed:
            del self.deltas[delta.msg_id]
        sent = self._send(owed)
        if sent:
            log.info("%s: took over partition %d: sent the outputs of %d messages its last owner had not "
                     "seen acknowledged", self.who, p, sent)
        return sent

    def forget(self, p: int) -> None:
        """Partition ``p`` is another node's now (what is on its way still settles, see :meth:`_send`)."""
        for msg_id in [k for k, d in self.deltas.items() if d.partition == p]:
            delta = self.deltas.pop(msg_id)
            if self.by.pop(msg_id, None) is not None:
                self._release(delta)

    def restandby(self, p: int) -> None:
        """Partition ``p`` has a new standby: it gets what is owed here, sent or not."""
        for delta in self.of(p):
            self._to_standby(delta, marked=False)

    def _send(self, owed: list[Delta]) -> int:
        """Send the outputs ``owed`` deltas carry, under their ids; returns for how many messages."""
        sent = 0
        for delta in owed:
            handler = self.handlers.get(delta.message_type)
            if handler is None:
                continue
            classes = {message_options(c).name: c for c in (*handler.emits, *handler.sends)}
            try:
                outputs: list[Message] = [decoder_for(classes[name]).decode(body) for name, body in delta.outputs]
            except (KeyError, msgspec.DecodeError, msgspec.ValidationError) as exc:
                self.host.count_refused("malformed", f"the outputs of {delta.message_type} in a delta of partition "
                                                     f"{delta.partition}: {exc!r}")
                continue
            acknowledged = _Countdown(partial(self._acknowledged, delta))
            self.sending[delta.msg_id] = delta
            try:
                acknowledged.add(self.host.send_outputs(_Owed(delta, handler), outputs, acknowledged))  # type: ignore[arg-type]
            except ChoreoError as exc:  # (a command whose service has no owner any more, say)
                self.sending.pop(delta.msg_id, None)
                self._sent_no_more(delta.msg_id)
                log.warning("%s: the outputs %s owed for %s could not be sent: %s", self.who,
                            delta.message_type, delta.msg_id.hex(), exc)
                continue
            self.sent += 1
            sent += 1
        return sent

    def _acknowledged(self, delta: Delta) -> None:
        if self.sending.pop(delta.msg_id, None) is not None:
            self._to_standby(delta, marked=True)
        self._sent_no_more(delta.msg_id)

    def _to_standby(self, delta: Delta, *, marked: bool) -> None:
        """Tell the standby of ``delta``'s partition what this node owes for its message (its id
        and outputs), or that it owes nothing any more (``marked``). Its writes are in the copy
        or the deltas already."""
        if self.replicas is not None:
            outputs = [] if marked else delta.outputs
            owed = msgspec.structs.replace(delta, writes=[], marked=marked, outputs=outputs, handed=False)
            self.replicas.ship(delta.partition, owed, nothing)


class _Countdown:
    """Calls ``then`` once when as many calls came as were :meth:`add`-ed (at once for none)."""

    __slots__ = ("left", "then")

    def __init__(self, then: Callable[[], None]) -> None:
        self.left, self.then = 0, then

    def add(self, n: int) -> None:
        self.left += n
        if self.left == 0:
            self.then()

    def __call__(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.then()


class _OwedEnvelope:
    __slots__ = ("msg_id", "trace_id")

    def __init__(self, msg_id: bytes, trace_id: bytes) -> None:
        self.msg_id, self.trace_id = msg_id, trace_id


class _Owed:
    """What :meth:`Calls.send_outputs` reads of a job, for the outputs a delta carried."""

    __slots__ = ("env", "handler")

    def __init__(self, delta: Delta, handler: Handler) -> None:
        self.env = _OwedEnvelope(delta.msg_id, delta.trace_id or delta.msg_id)
        self.handler = handler
