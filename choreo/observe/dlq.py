"""``choreo dlq``: the dead letters of the whole mesh, listed, shown and replayed.

How this works: each node keeps the dead letters of the handlers it ran (payload, error,
attempts); ids are per node, so a letter is named ``NODE:ID`` (``payments#1a2b3c:4``), or by its
bare ``ID`` when only one node of the mesh has a letter with that id. ``replay`` asks the
letter's own node to run its handler again, once: the node takes the letter out of its store
and runs it with the handler's retry policy; if it fails again it comes back with ``replays``
counted. A second replay of the same letter finds nothing to replay, so a replay that was
retried by an impatient operator still processes the message once. :func:`outcome` waits (bounded)
for how a replay ended: handled, failed again (the letter is back), or still running.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..client import rpc
from ..errors import ChoreoUsageError
from ..terminal import plural
from .mesh import discover, gather

__all__ = ["Letters", "collect", "find", "show", "replay", "outcome", "render_list", "render_show", "jsonable"]


@dataclass
class Letters:
    letters: list[dict[str, Any]]  # each with "node" and "endpoint"
    unreachable: list[dict[str, str]]


def jsonable(value: Any) -> Any:
    """Payloads decoded from MessagePack may hold bytes or non-string keys: make them JSON data."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def collect(seed: str, timeout: float = 5.0, payload: bool = True) -> Letters:
    """Every dead letter of every live node that handles something."""
    nodes = [n for n in discover(seed, timeout) if n.service is not None]
    letters, failed = [], []
    for node, answer in gather(nodes, "dlq.letters", {"payload": payload, "limit": 100_000}, timeout):
        if isinstance(answer, Exception):
            failed.append({"node": node.name, "endpoint": node.endpoint, "error": str(answer)})
            continue
        for letter in answer:
            letter["endpoint"] = node.endpoint
            letter["ref"] = f"{letter['node']}:{letter['id']}"
            letters.append(jsonable(letter))
    letters.sort(key=lambda d: (d.get("failed_at", 0), d["node"], d["id"]))
    return Letters(letters, failed)


def find(found: Letters, ref: str) -> dict[str, Any]:
    """The letter named ``NODE:ID`` or ``ID``; ChoreoUsageError naming the candidates otherwise."""
    node, sep, raw = ref.rpartition(":")
    try:
        letter_id = int(raw)
    except ValueError:
        raise ChoreoUsageError(f"a dead letter is named NODE:ID or ID (as 'choreo dlq list' shows), got {ref!r}") from None
    matches = [d for d in found.letters if d["id"] == letter_id and (not sep or d["node"] == node)]
    if not matches:
        known = ", ".join(d["ref"] for d in found.letters[:10]) or "none"
        raise ChoreoUsageError(f"no dead letter {ref} in the mesh (letters: {known})")
    if len(matches) > 1:
        raise ChoreoUsageError(
            f"dead letter id {letter_id} exists on several nodes: name one of {', '.join(d['ref'] for d in matches)}"
        )
    return matches[0]


def replay(letter: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Ask the letter's node to run it again, once; returns the node's summary of the letter."""
    return rpc(letter["endpoint"], "dlq.replay", {"id": letter["id"]}, timeout=timeout)  # type: ignore[no-any-return]


def outcome(letter: dict[str, Any], replays: int, timeout: float = 5.0, wait: float = 10.0) -> dict[str, Any]:
    """How the replay number ``replays`` of ``letter`` ended, asked of its node until it is known or
    ``wait`` seconds passed: ``{"state": "handled" | "failed" | "running" | "gone", "error", "attempts"}``."""
    deadline = time.monotonic() + wait
    args = {"id": letter["id"], "msg_id": letter["msg_id"], "replay": replays}
    while True:
        answer: dict[str, Any] = rpc(letter["endpoint"], "dlq.outcome", args, timeout=timeout)
        if answer["state"] != "running" or time.monotonic() >= deadline:
            return answer
        time.sleep(0.05)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _short(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def render_list(found: Letters) -> str:
    """A table: ref, type, handler, attempts, when it last failed, the error and the payload."""
    if not found.letters:
        lines = ["no dead letters in the mesh"]
    else:
        import json

        width = max(len("LETTER"), *(len(d["ref"]) for d in found.letters)) + 2
        lines = [f"{'LETTER':<{width}}{'TYPE':<20}{'HANDLER':<28}{'TRIES':>5}  {'FAILED AT':<19}  ERROR / PAYLOAD"]
        for d in found.letters:
            handler = f"{d['service']}.{d['handler'].rsplit('.<locals>.', 1)[-1]}"
            tries = f"{d['attempts']}" + (f"+{d['replays']}r" if d.get("replays") else "")
            lines.append(
                f"{d['ref']:<{width}}{_short(d['type'], 19):<20}{_short(handler, 27):<28}{tries:>5}  "
                f"{_when(d.get('failed_at')):<19}  {_short(d['error_type'] + ': ' + d['error'], 60)}"
            )
            if "payload" in d:
                lines.append(f"{'':<{width}}{'':<20}{'':<28}{'':>5}  {'':<19}  {_short(json.dumps(d['payload']), 60)}")
        n = len(found.letters)
        lines.append("")
        lines.append(f"{n} dead letter{'' if n == 1 else 's'}; 'choreo dlq show LETTER' for one, 'choreo dlq replay LETTER' to run it again")
    for u in found.unreachable:
        lines.append(f"! no answer from {u['node']} ({u['endpoint']}): {u['error']}")
    return "\n".join(lines) + "\n"


def render_show(letter: dict[str, Any], traceback: str | None = None) -> str:
    """One letter in full: where, what, why, the payload and the handler's traceback."""
    import json

    lines = [
        f"dead letter {letter['ref']}",
        f"  type       {letter['type']}",
        f"  handler    {letter['service']}.{letter['handler']} on {letter['node']} ({letter['endpoint']})",
        f"  message    {letter['msg_id']}  key {letter['key']!r}  partition {letter['partition']}",
        f"  trace      {letter['trace_id']}   (choreo trace {letter['trace_id']} --peer ...)",
        f"  attempts   {letter['attempts']}" + (f", replayed {plural(letter['replays'], 'time')}" if letter.get("replays") else ""),
        f"  failed at  {_when(letter.get('failed_at'))}",
        f"  error      {letter['error_type']}: {letter['error']}",
        "  payload",
    ]
    lines += ["    " + line for line in json.dumps(letter.get("payload"), indent=2, ensure_ascii=False).splitlines()]
    if traceback:
        lines.append("  traceback")
        lines += ["    " + line for line in traceback.rstrip().splitlines()]
    return "\n".join(lines) + "\n"


def show(letter: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """The letter with its traceback (asked of its node)."""
    full = rpc(letter["endpoint"], "dlq.show", {"id": letter["id"]}, timeout=timeout)
    out = dict(letter)
    out["traceback"] = full.get("traceback")
    return out

