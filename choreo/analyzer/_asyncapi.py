"""AsyncAPI output: one AsyncAPI 3.0.0 document for the whole system.

How this works: AsyncAPI describes operations from one application's point of view; a
choreography has many applications, so each service's operations are listed side by side, named
``SERVICE.send.TYPE`` / ``SERVICE.receive.TYPE`` and tagged with the service. Every message type
is a channel whose address is the type's wire name, carrying one message whose payload schema is
built from the fields' JSON schemas. Commands and queries get a reply channel (the answer travels
back to the caller, so its address is dynamic: ``null``) whose message is the declared result
type. Referenced schema definitions (``defs``) move to ``components/schemas`` and every
``#/$defs/X`` reference is rewritten to point there; two different definitions with the same name
get distinct keys. choreo's own options (key, idempotency, dedup window, handler, module:line)
ride along as ``x-choreo-*`` extensions.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .. import __version__
from ._analysis import Analysis
from ._graph import handlers, message_spec_of, messages, producers, services, short_name

__all__ = ["render_asyncapi", "asyncapi_document"]

CONTENT_TYPE = "application/msgpack"
_KEY_BAD = re.compile(r"[^\w.\-]")


def _key(name: str) -> str:
    """A component/channel key AsyncAPI accepts (``^[\\w\\d.\\-_]+$``)."""
    return _KEY_BAD.sub("_", name) or "_"


class _Schemas:
    """``components/schemas``: definitions from every message, with references rewritten."""

    def __init__(self) -> None:
        self.out: dict[str, Any] = {}
        self._raw: dict[str, Any] = {}

    def add(self, defs: dict[str, Any]) -> dict[str, str]:
        """Store one message's definitions; returns its rename map (definition name -> key)."""
        rename: dict[str, str] = {}
        for name, schema in defs.items():
            base = candidate = _key(name)
            n = 2
            while candidate in self._raw and self._raw[candidate] != schema:
                candidate, n = f"{base}_{n}", n + 1
            rename[name] = candidate
        for name, schema in defs.items():
            if rename[name] not in self._raw:
                self._raw[rename[name]] = schema
                self.out[rename[name]] = rewrite_refs(schema, rename)
        return rename


def rewrite_refs(schema: Any, rename: dict[str, str]) -> Any:
    """A copy of a JSON schema whose ``#/$defs/X`` references point into ``components/schemas``."""
    if isinstance(schema, dict):
        out = {}
        for k, v in schema.items():
            if k == "$ref" and isinstance(v, str) and v.startswith("#/$defs/"):
                name = v[len("#/$defs/") :]
                out[k] = f"#/components/schemas/{rename.get(name, _key(name))}"
            else:
                out[k] = rewrite_refs(v, rename)
        return out
    if isinstance(schema, list):
        return [rewrite_refs(v, rename) for v in schema]
    return schema


def _payload(spec: dict[str, Any] | None, name: str, rename: dict[str, str]) -> dict[str, Any]:
    if spec is None:
        return {"description": f"{name} is declared nowhere in the system: its fields are unknown"}
    payload: dict[str, Any] = {
        "type": "object",
        "title": name,
        "properties": {f["name"]: rewrite_refs(f["schema"], rename) for f in spec["fields"]},
    }
    required = [f["name"] for f in spec["fields"] if f["required"]]
    if required:
        payload["required"] = required
    if spec.get("doc"):
        payload["description"] = spec["doc"]
    return payload


def _where(module: str, line: int) -> str:
    return f"{module}:{line}" if module else ""


def asyncapi_document(analysis: Analysis) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document as plain data.

    >>> from choreo.spec import SystemSpec, ServiceSpec, HandlerSpec
    >>> from choreo.analyzer import analyze
    >>> doc = asyncapi_document(analyze(SystemSpec(services=(ServiceSpec("orders", handlers=(
    ...     HandlerSpec("place", "command", "PlaceOrder"),)),)), name="shop"))
    >>> doc["asyncapi"], sorted(doc["operations"])
    ('3.0.0', ['orders.receive.PlaceOrder'])
    """
    g = analysis.graph
    schemas = _Schemas()
    channels: dict[str, Any] = {}
    components_messages: dict[str, Any] = {}
    reply_of: dict[str, dict[str, Any]] = {}
    for m in messages(g):
        name, kind = m["name"], m["kind"]
        key = _key(name)
        spec = message_spec_of(g, name)
        rename = schemas.add(spec.get("defs", {})) if spec else {}
        summary = f"{kind} {name}" + (f", keyed by {spec['key']}" if spec and spec.get("key") else "")
        message: dict[str, Any] = {
            "name": name,
            "title": name,
            "summary": summary,
            "payload": _payload(spec, name, rename),
            "tags": [{"name": kind}],
        }
        if spec:
            message["x-choreo"] = {
                "kind": kind,
                "key": spec.get("key"),
                "idempotency": spec.get("idempotency"),
                "dedup_ttl": spec.get("dedup_ttl"),
                "dedup_max": spec.get("dedup_max"),
                "declared_at": _where(spec.get("module", ""), spec.get("line", 0)),
            }
            if spec.get("doc"):
                message["description"] = spec["doc"]
        components_messages[key] = message
        channels[key] = {
            "address": name,
            "title": name,
            "summary": summary,
            "messages": {key: {"$ref": f"#/components/messages/{key}"}},
        }
        if kind in ("command", "query"):
            reply_key = f"{key}.reply"
            returns = spec.get("returns") if spec else None
            payload = (
                rewrite_refs(returns, rename)
                if returns is not None
                else {"description": "any MessagePack value (the type declares no returns=)"}
            )
            components_messages[reply_key] = {
                "name": f"{name}.reply",
                "title": f"reply to {name}",
                "summary": f"the result of {kind} {name}, sent back to the caller",
                "payload": payload,
            }
            channels[reply_key] = {
                "address": None,
                "title": f"reply to {name}",
                "summary": "replies travel back to the calling instance; the address is set per call",
                "messages": {reply_key: {"$ref": f"#/components/messages/{reply_key}"}},
            }
            reply_of[name] = {
                "channel": {"$ref": f"#/channels/{reply_key}"},
                "messages": [{"$ref": f"#/channels/{reply_key}/messages/{reply_key}"}],
            }

    operations: dict[str, Any] = {}
    for s in services(g):
        for m in messages(g):
            name, kind = m["name"], m["kind"]
            key = _key(name)
            ref = {"channel": {"$ref": f"#/channels/{key}"}, "messages": [{"$ref": f"#/channels/{key}/messages/{key}"}]}
            mine = [p for p in producers(g, name) if p.service == s]
            if mine:
                verb = "emits" if kind == "event" else ("asks" if kind == "query" else "sends")
                op: dict[str, Any] = {
                    "action": "send",
                    **ref,
                    "summary": f"{s} {verb} {name}",
                    "description": "Declared by " + "; ".join(f"{p.label} ({p.location.where})" for p in mine) + ".",
                    "tags": [{"name": s}],
                    "x-choreo-producers": [{"handler": p.handler, "module": p.module, "line": p.line} for p in mine],
                }
                if name in reply_of:
                    op["reply"] = reply_of[name]
                operations[f"{_key(s)}.send.{key}"] = op
            for h in handlers(g, name):
                if h.service != s:
                    continue
                op = {
                    "action": "receive",
                    **ref,
                    "summary": f"{s} handles {name} in {short_name(h.name)}",
                    "description": f"Handler {h.label} ({h.location.where})"
                    + (f", keyed by {h.key_field}" if h.key_field else "")
                    + (", on every instance (broadcast)" if h.broadcast else "")
                    + (f"; emits {', '.join(h.emits)}" if h.emits else "")
                    + (f"; sends {', '.join(h.sends)}" if h.sends else "")
                    + ".",
                    "tags": [{"name": s}],
                    "x-choreo-handler": {
                        "name": h.name,
                        "key": h.key_field,
                        "broadcast": h.broadcast,
                        "emits": list(h.emits),
                        "sends": list(h.sends),
                        "module": h.module,
                        "line": h.line,
                    },
                }
                if name in reply_of:
                    op["reply"] = reply_of[name]
                operations[f"{_key(s)}.receive.{key}"] = op

    title = analysis.name or "choreo system"
    doc: dict[str, Any] = {
        "asyncapi": "3.0.0",
        "info": {
            "title": title,
            "version": "0.0.0",
            "description": f"Generated by choreo {__version__} from the services' declarations: "
            f"{analysis.summary()}. Each operation is one service's; its tag names the service.",
            "tags": [
                {
                    "name": s,
                    **({"description": g.nodes[f"service:{s}"]["doc"]} if g.nodes[f"service:{s}"]["doc"] else {}),
                }
                for s in services(g)
            ],
        },
        "defaultContentType": CONTENT_TYPE,
        "channels": channels,
        "operations": operations,
        "components": {"messages": components_messages},
    }
    if schemas.out:
        doc["components"]["schemas"] = schemas.out
    return doc


def render_asyncapi(analysis: Analysis) -> str:
    """The AsyncAPI document as JSON text (JSON is valid AsyncAPI; YAML tools read it too)."""
    return json.dumps(asyncapi_document(analysis), indent=2, ensure_ascii=False) + "\n"
