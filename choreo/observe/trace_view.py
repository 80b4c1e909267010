"""One flow across the mesh: spans from every node -> a tree by cause, with timings and verdicts.

How this works: every node answers ``trace`` with its spans of a trace (one per handler attempt)
and what is still running there. :func:`assemble` groups the attempts of one message in one
handler on one instance into a *step*, hangs each step under the step that caused it (the
envelope carries its cause's message id; when a message was handled by several handlers, the
one whose declaration emits or sends this step's type is the parent), and then marks:

* the **critical path**: from the step that finished last, up through its causes to the root:
  the chain that set the flow's end-to-end time (steps whose every effect was deduplicated, like
  a retry that only led to a duplicate, did not advance the flow and do not count);
* the **failing steps**: those whose last attempt raised (with the error and the attempts);
* the **duplicates**: a message the node had already handled (a client's retry, a redelivery)
  is acknowledged without running its handler, and its span says ``duplicate``. Each becomes a
  step of its own under the step that sent it (not an attempt of the original), so a retried
  request shows both its attempts and where the retry stopped. Duplicates cause nothing, so
  they are never a parent.

Times are seconds on each node's monotonic clock, anchored to its wall clock (see
:mod:`choreo.tracing`): the times of one node never jump, and hosts need synchronised clocks only
for the gaps between steps on different hosts to mean something. A dead letter replayed from
``choreo dlq replay`` shows as the next attempts of its step (``replay`` 1, 2... in the attempt
log), not as a new step. Per step: ``offset_ms`` (received, from the start of the flow),
``queue_ms`` (received -> first attempt started), ``handler_ms`` (time inside the handler, all
attempts), ``duration_ms`` (received -> last attempt finished, retries' backoff included) and
``transit_ms`` (the parent's handler finished -> this step received: network and batching).

:func:`to_json` gives the stable document ``choreo trace --json`` prints (format
``choreo-trace/1``, described in :data:`JSON_FIELDS`); :func:`render_text` the terminal tree.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..terminal import Style, short_name

__all__ = ["Attempt", "Step", "Trace", "assemble", "to_json", "render_text", "JSON_FIELDS", "FORMAT"]

FORMAT = "choreo-trace/1"
ZERO = "0" * 32
IN_PROGRESS = ("running", "queued", "retrying")
DUPLICATE = "duplicate"

#: The JSON document of ``choreo trace --json``; every key is always present.
JSON_FIELDS: dict[str, str] = {
    "format": '"choreo-trace/1"',
    "trace_id": "32 hex digits",
    "status": '"ok" | "error" (a step failed) | "running" (a step is still in progress)',
    "started": "wall-clock seconds: the first step received",
    "finished": "wall-clock seconds: the last step finished (now, for running steps)",
    "duration_ms": "finished - started",
    "services": "names of the services the flow went through, sorted",
    "roots": "indexes of the steps without a known cause (normally one: the message from outside)",
    "critical_path": "indexes of the steps from the root to the step that finished last (of those not only deduplicated)",
    "failures": "indexes of the steps whose last attempt failed",
    "duplicates": "indexes of the steps that were duplicates: acknowledged without running the handler",
    "steps": "every step in tree order (depth first, children by time received); see STEP_FIELDS",
    "nodes": '{"asked": N, "answered": [names], "unreachable": [{"node", "endpoint", "error"}]}',
}
STEP_FIELDS: dict[str, str] = {
    "index": "position in steps",
    "parent": "index of the causing step, or null",
    "children": "indexes of the steps this one caused",
    "depth": "0 for a root",
    "msg_id": "32 hex digits",
    "cause_id": "32 hex digits (zeros: from outside)",
    "cause_missing": "true when the cause is not zero but no node remembers it",
    "type": "message type",
    "kind": '"event" | "command" | "query" | null (unknown to the mesh spec)',
    "service": "service that handled it",
    "instance": "node (instance) that handled it",
    "handler": "handler's name",
    "key": "ordering key ('' when unkeyed)",
    "partition": "key partition",
    "received": "wall-clock seconds",
    "started": "first attempt started (0 while queued)",
    "finished": "last attempt finished (now, while in progress)",
    "offset_ms": "received - the flow's start",
    "queue_ms": "started - received",
    "handler_ms": "time inside the handler, summed over attempts",
    "duration_ms": "finished - received",
    "transit_ms": "received - the parent's finished, or null for a root",
    "outcome": '"ok" | "error" | "running" | "queued" | "retrying" | "duplicate" (not run again)',
    "error": "the last attempt's error (\"Type: message\"), or null",
    "attempts": "number of attempts so far",
    "attempt_log": '[{"attempt", "started", "finished", "outcome", "error", "replay"}], oldest first; '
    "replay is 0 for attempts as the message arrived, n for those of its n-th replay from the dead letters",
    "replays": "how many times the step was replayed from the dead letters",
    "critical": "on the critical path",
    "failed": "outcome is error",
}


@dataclass
class Attempt:
    attempt: int
    started: float
    finished: float
    outcome: str
    error: str | None
    replay: int = 0


@dataclass
class Step:
    msg_id: str
    cause_id: str
    type: str
    service: str
    instance: str
    handler: str
    key: str
    partition: int
    received: float
    attempts: list[Attempt] = field(default_factory=list)
    kind: str | None = None
    index: int = -1
    parent: Step | None = None
    children: list[Step] = field(default_factory=list)
    depth: int = 0
    critical: bool = False
    cause_missing: bool = False

    @property
    def outcome(self) -> str:
        return self.attempts[-1].outcome if self.attempts else "queued"

    @property
    def error(self) -> str | None:
        for a in reversed(self.attempts):
            if a.error:
                return a.error if a.outcome != "ok" else None
        return None

    @property
    def started(self) -> float:
        starts = [a.started for a in self.attempts if a.started]
        return min(starts) if starts else 0.0

    @property
    def finished(self) -> float:
        return max((a.finished for a in self.attempts), default=self.received)

    @property
    def handler_seconds(self) -> float:
        if self.duplicate:
            return 0.0
        return sum(max(a.finished - a.started, 0.0) for a in self.attempts if a.started)

    @property
    def failed(self) -> bool:
        return self.outcome == "error"

    @property
    def duplicate(self) -> bool:
        """A message already handled here, acknowledged without running the handler again."""
        return self.outcome == DUPLICATE

    @property
    def attempt_count(self) -> int:
        return max((a.attempt for a in self.attempts), default=0)

    @property
    def replays(self) -> int:
        return max((a.replay for a in self.attempts), default=0)

    @property
    def label(self) -> str:
        return f"{self.service}.{short_name(self.handler)}"


@dataclass
class Trace:
    trace_id: str
    steps: list[Step]  # tree order
    roots: list[Step]
    critical_path: list[Step]
    failures: list[Step]
    duplicates: list[Step] = field(default_factory=list)
    asked: int = 0
    answered: list[str] = field(default_factory=list)
    unreachable: list[dict[str, str]] = field(default_factory=list)

    @property
    def status(self) -> str:
        if any(s.outcome in IN_PROGRESS for s in self.steps):
            return "running"
        return "error" if self.failures else "ok"

    @property
    def started(self) -> float:
        return min((s.received for s in self.steps), default=0.0)

    @property
    def finished(self) -> float:
        return max((s.finished for s in self.steps), default=0.0)

    @property
    def services(self) -> list[str]:
        return sorted({s.service for s in self.steps})


def _emitters(spec: Any) -> tuple[dict[tuple[str, str], set[str]], dict[str, str]]:
    """(service, handler) -> the types it emits or sends; and type -> kind. From a SystemSpec."""
    outputs: dict[tuple[str, str], set[str]] = {}
    kinds: dict[str, str] = {}
    if spec is None:
        return outputs, kinds
    for name, m in spec.messages.items():
        kinds[name] = m.kind
    for s in spec.services:
        for h in s.handlers:
            outputs[(s.name, h.name)] = set(h.emits) | set(h.sends)
            kinds.setdefault(h.message, h.kind)
    return outputs, kinds


def assemble(
    trace_id: str,
    answers: Iterable[Mapping[str, Any]],
    spec: Any = None,
) -> Trace:
    """Build the :class:`Trace` from the nodes' ``trace`` answers (and the mesh's SystemSpec, if known)."""
    steps: dict[tuple[str, str, str], Step] = {}
    seen: set[tuple[Any, ...]] = set()
    outputs, kinds = _emitters(spec)
    for answer in answers:
        records = [*answer.get("spans", ()), *answer.get("running", ())]
        for r in records:
            ident = (r["msg_id"], r["instance"], r["handler"], r["attempt"], r["outcome"], r["started"])
            if ident in seen:
                continue
            seen.add(ident)
            k: tuple[Any, ...] = (r["msg_id"], r["instance"], r["handler"])
            if r["outcome"] == DUPLICATE:  # one step per dropped copy, under whatever sent it
                k = (*k, DUPLICATE, r["cause_id"], r["started"])
            step = steps.get(k)
            if step is None:
                step = steps[k] = Step(
                    msg_id=r["msg_id"],
                    cause_id=r["cause_id"],
                    type=r["type"],
                    service=r["service"],
                    instance=r["instance"],
                    handler=r["handler"],
                    key=r.get("key", ""),
                    partition=r.get("partition", 0),
                    received=r["received"],
                    kind=kinds.get(r["type"]),
                )
            step.received = min(step.received, r["received"])
            if step.cause_id == ZERO:  # a replay does not carry its cause: the original's spans do
                step.cause_id = r["cause_id"]
            step.attempts.append(
                Attempt(r["attempt"], r["started"], r["finished"], r["outcome"], r.get("error"), r.get("replay", 0))
            )
    for step in steps.values():
        # finished attempts by time; an in-progress record (at most one) goes last
        step.attempts.sort(key=lambda a: (a.outcome in IN_PROGRESS, a.replay, a.started, a.attempt))
        done = [a for a in step.attempts if a.outcome not in IN_PROGRESS]
        live = [a for a in step.attempts if a.outcome in IN_PROGRESS]
        if live and done and done[-1].outcome == "ok":
            live = []  # the handler finished between the two reads of the node
        step.attempts = done + live[-1:]

    by_msg: dict[str, list[Step]] = {}
    for step in steps.values():
        by_msg.setdefault(step.msg_id, []).append(step)
    roots: list[Step] = []
    for step in sorted(steps.values(), key=lambda s: (s.received, s.instance)):
        if step.cause_id == ZERO:
            roots.append(step)
            continue
        candidates = [c for c in by_msg.get(step.cause_id, ()) if c is not step and not c.duplicate]
        if not candidates:
            step.cause_missing = True
            roots.append(step)
            continue
        declared = [c for c in candidates if step.type in outputs.get((c.service, c.handler), ())]
        pool = declared or candidates
        pool.sort(key=lambda c: (c.outcome != "ok", c.finished))
        step.parent = pool[0]
        step.parent.children.append(step)

    ordered: list[Step] = []

    def walk(step: Step, depth: int) -> None:
        step.depth = depth
        step.index = len(ordered)
        ordered.append(step)
        step.children.sort(key=lambda c: (c.received, c.service, c.instance))
        for child in step.children:
            walk(child, depth + 1)

    for root in roots:
        walk(root, 0)

    critical: list[Step] = []
    if ordered:
        advanced: dict[int, bool] = {}  # did the step move the flow on? (children come after parents)
        for s in reversed(ordered):
            advanced[s.index] = not s.duplicate and (not s.children or any(advanced[c.index] for c in s.children))
        last = max([s for s in ordered if advanced[s.index]] or ordered, key=lambda s: (s.finished, -s.index))
        node: Step | None = last
        while node is not None:
            node.critical = True
            critical.append(node)
            node = node.parent
        critical.reverse()
    failures = [s for s in ordered if s.failed]
    return Trace(trace_id, ordered, roots, critical, failures, [s for s in ordered if s.duplicate])


# ---- JSON ----------------------------------------------------------------------------------------


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def to_json(trace: Trace) -> dict[str, Any]:
    """The ``choreo-trace/1`` document (see :data:`JSON_FIELDS` and :data:`STEP_FIELDS`)."""
    start = trace.started
    steps = []
    for s in trace.steps:
        steps.append(
            {
                "index": s.index,
                "parent": s.parent.index if s.parent else None,
                "children": [c.index for c in s.children],
                "depth": s.depth,
                "msg_id": s.msg_id,
                "cause_id": s.cause_id,
                "cause_missing": s.cause_missing,
                "type": s.type,
                "kind": s.kind,
                "service": s.service,
                "instance": s.instance,
                "handler": s.handler,
                "key": s.key,
                "partition": s.partition,
                "received": s.received,
                "started": s.started,
                "finished": s.finished,
                "offset_ms": _ms(s.received - start),
                "queue_ms": _ms(s.started - s.received) if s.started else None,
                "handler_ms": _ms(s.handler_seconds),
                "duration_ms": _ms(s.finished - s.received),
                "transit_ms": _ms(s.received - s.parent.finished) if s.parent else None,
                "outcome": s.outcome,
                "error": s.error,
                "attempts": s.attempt_count,
                "attempt_log": [
                    {"attempt": a.attempt, "started": a.started, "finished": a.finished, "outcome": a.outcome,
                     "error": a.error, "replay": a.replay}
                    for a in s.attempts
                ],  # fmt: skip
                "replays": s.replays,
                "critical": s.critical,
                "failed": s.failed,
            }
        )
    return {
        "format": FORMAT,
        "trace_id": trace.trace_id,
        "status": trace.status,
        "started": trace.started,
        "finished": trace.finished,
        "duration_ms": _ms(trace.finished - trace.started),
        "services": trace.services,
        "roots": [s.index for s in trace.roots],
        "critical_path": [s.index for s in trace.critical_path],
        "failures": [s.index for s in trace.failures],
        "duplicates": [s.index for s in trace.duplicates],
        "steps": steps,
        "nodes": {"asked": trace.asked, "answered": list(trace.answered), "unreachable": list(trace.unreachable)},
    }


# ---- text ----------------------------------------------------------------------------------------

_OUTCOME_COLOUR = {"ok": "green", "error": "red", "running": "cyan", "queued": "dim", "retrying": "yellow",
                   DUPLICATE: "magenta"}  # fmt: skip


def _fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000.0
    if ms >= 10_000:
        return f"{ms / 1000:.1f}s"
    if ms >= 100:
        return f"{ms:.0f}ms"
    return f"{ms:.1f}ms"


def _attempts(step: Step) -> str:
    """``3 attempts``, or ``5 attempts (2 in replay 1)`` for a step replayed from the dead letters."""
    n = step.attempt_count
    text = f"{n} attempt{'' if n == 1 else 's'}"
    if step.replays:
        last = step.replays
        in_last = sum(1 for a in step.attempts if a.replay == last)
        text += f" ({in_last} in replay {last})"
    return text


def render_text(trace: Trace, style: Style = Style(), now: float | None = None) -> str:
    """The flow as a tree, one line per step: when it was received (from the flow's start), how
    long it queued, ran in its handler (all attempts) and took in all (received to finished,
    retries included), then ``message -> service.handler @instance``; the critical path starred,
    failures crossed, duplicates marked ``deduplicated: not run again``.

    >>> t = assemble("ab" * 16, [{"spans": [dict(msg_id="1" * 32, cause_id="0" * 32, type="Go", service="a",
    ...     instance="a#1", handler="go", received=0.0, started=0.001, finished=0.003, outcome="ok",
    ...     error=None, attempt=1)]}])
    >>> print(render_text(t).splitlines()[0])
    trace abababababababababababababababab: ok, 1 step, 1 service, 3.0ms
    """
    star, cross = ("★", "✗") if style.unicode else ("*", "x")
    mid, last, cont, blank = style.branch
    n = len(trace.steps)
    status = style.paint(trace.status, "bold", _OUTCOME_COLOUR.get(trace.status, "bold"))
    services = len(trace.services)
    lines = [
        style.paint(f"trace {trace.trace_id}: ", "bold")
        + f"{status}, {n} step{'' if n == 1 else 's'}, {services} service{'' if services == 1 else 's'}, "
        + _fmt_ms(trace.finished - trace.started)
    ]
    for s in trace.failures:
        lines.append(
            style.paint(f"  {cross} failed: ", "red", "bold")
            + f"{s.type} in {s.label} on {s.instance} after {_attempts(s)}: "
            + style.paint(s.error or "?", "red")
        )
    if trace.duplicates:
        where: dict[str, int] = {}
        for s in trace.duplicates:
            place = f"{s.type} at {s.instance}"
            where[place] = where.get(place, 0) + 1
        n_dup = len(trace.duplicates)
        places = ", ".join(f"{p} x{c}" if c > 1 else p for p, c in where.items())
        lines.append(
            style.paint(f"  = deduplicated: {n_dup} duplicate{'' if n_dup == 1 else 's'} ", "magenta", "bold")
            + f"({places}): acknowledged without running the handler again"
        )
    if trace.unreachable:
        names = ", ".join(u["node"] for u in trace.unreachable)
        lines.append(style.paint(f"  ! no answer from {names}: steps handled there are missing", "yellow"))
    lines.append("")
    lines.append(style.paint(f"{'AT':>9} {'QUEUE':>8} {'HANDLER':>8} {'TOOK':>8}  STEP", "bold"))
    start = trace.started

    def tree_prefix(step: Step) -> str:
        parts: list[str] = []
        node = step
        while node.parent is not None:
            siblings = node.parent.children
            is_last = siblings[-1] is node
            parts.append((last if is_last else mid) if node is step else (blank if is_last else cont))
            node = node.parent
        return "".join(reversed(parts))

    for s in trace.steps:
        mark = style.paint(star, "yellow", "bold") if s.critical else " "
        outcome = s.outcome
        bits = [
            style.paint(s.type, "bold"),
            "->",
            style.paint(s.label, "cyan"),
            style.paint(f"@{s.instance}", "dim"),
        ]
        if s.key:
            bits.append(style.paint(f"key={s.key}", "dim"))
        if s.attempt_count > 1 or s.replays:
            bits.append(_attempts(s))
        if outcome == "error":
            bits.append(style.paint(f"{cross} {s.error}", "red", "bold"))
        elif outcome == DUPLICATE:
            bits.append(style.paint("= deduplicated: not run again", "magenta", "bold"))
        elif outcome != "ok":
            bits.append(style.paint(outcome, _OUTCOME_COLOUR[outcome]))
        if s.cause_missing:
            bits.append(style.paint("(cause not found)", "yellow"))
        queue = (s.started - s.received) if s.started else None
        ran = None if s.duplicate else s.handler_seconds  # its handler did not run: "-"
        lines.append(
            f"{'+' + _fmt_ms(s.received - start):>9} {_fmt_ms(queue):>8} {_fmt_ms(ran):>8} "
            f"{_fmt_ms(s.finished - s.received):>8}  "
            f"{tree_prefix(s)}{mark} {' '.join(bits)}"
        )
    if trace.critical_path:
        path = " -> ".join(s.label for s in trace.critical_path)
        lines.append("")
        lines.append(f"{style.paint(star, 'yellow', 'bold')} critical path: {path}")
    if now is not None and trace.status == "running":
        lines.append(style.paint(f"  (in progress, as of {time.strftime('%H:%M:%S', time.localtime(now))})", "dim"))
    return "\n".join(lines) + "\n"
