"""Admission: who may speak for whom, and say what, at the door of the receive path.

Two checks, the first always on, the second when the mesh has keys:

* **Sender binding.** A frame carries the incarnation it speaks for in its header; anyone could
  write any incarnation there. So a node remembers the connection each peer joined on (the
  identity the transport reports for its hello, and with keys the key that connection
  authenticated as, its *principal*), and accepts a frame that speaks for that peer only from
  that same connection and key (a member it only heard of by gossip is bound to the connection
  of its first frame, whose key must be allowed to serve what it claims). A forged BYE, heartbeat, ack, answer, data or REFUSE for
  somebody else is refused and counted (``impersonation``); a frame from a sender that never
  joined is refused too, except the few a stranger may legitimately send (a hello, a system
  query, and a refusal of our own hello). A node's connections always carry the routing id its
  transport chose; a connection without one has an id ZeroMQ made up, starting with a zero
  byte: a socket that never named itself, or a node's connection that its reconnection took
  over (``ROUTER_HANDOVER`` renames the old one, and frames still queued on it arrive under
  the made-up id). Such a connection never binds a member, and a member's frames on it are
  dropped (``replaced_connection``): its sender resends what matters on the connection it
  uses now.
* **Rights** (with keys, :class:`~choreo.trust.Policy`). A hello may claim a service only with a
  key allowed to serve it; a client key's envelopes must be of types it may originate; a service
  instance's envelopes must be of types its declarations produce (or, between instances of one
  service, the types it consumes: forwards); a hand-over comes only from an instance of the
  service; a system query needs the key's admin right. (And, keys or not, a caller takes an
  answer only from an instance of the service its request went to: :meth:`Calls.on_reply`.)
  Every refusal is counted by reason and logged with the key's name.

A stranger's word never stops a node: a REFUSE "conflict" from a node this one has not joined
is advisory (logged, counted) unless a key that may serve the conflicting service says it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import wire
from ..spec import ServiceSpec
from .channels import InChannel
from .membership import Peer

__all__ = ["Admission", "PolicySource", "STRANGER_FRAMES", "unnamed"]

#: frame types a sender that is not a member here may send: its hello, a client's system query,
#: the REFUSE with which a seed answers our hello, and the PING with which a newcomer introduces
#: itself (its own record rides on it; gossip takes nothing else from a stranger)
STRANGER_FRAMES = frozenset({wire.HELLO, wire.RPC, wire.REFUSE, wire.PING})

def unnamed(identity: bytes | None) -> bool:
    """Whether a connection's routing id is one ZeroMQ made up (see the module docstring): it
    never binds a member."""
    return identity is not None and identity[:1] == b"\x00"


PolicySource = Callable[[], Any]  # () -> choreo.trust.Policy (re-read when the keys directory changes)


def _outputs(spec: ServiceSpec) -> frozenset[str]:
    """Every type a service may put on the wire: what its handlers emit and send, and what it
    declares it originates."""
    out = set(spec.emits) | set(spec.sends)
    for h in spec.handlers:
        out.update(h.emits)
        out.update(h.sends)
    return frozenset(out)


def _inputs(spec: ServiceSpec) -> frozenset[str]:
    return frozenset(h.message for h in spec.handlers)


class Admission:
    """The checks of one node (see the module docstring). ``policy`` is None without keys."""

    def __init__(self, policy: PolicySource | None, service: ServiceSpec | None) -> None:
        self.policy = policy
        self.service = service
        self.secure = policy is not None  # (an attribute: every data frame asks)

    # -- sender binding --------------------------------------------------------------------------

    def speaks_for(
        self, peer: Peer | None, frame_type: int, identity: bytes | None, principal: str | None
    ) -> tuple[str, str] | None:
        """None when a frame whose header names ``peer`` may be taken from this connection, else
        the reason it is refused under and why."""
        if peer is None:
            if frame_type in STRANGER_FRAMES:
                return None
            return "unknown_peer", f"a {wire.FRAME_NAMES.get(frame_type, frame_type)} frame from a node that is not a member here"
        if unnamed(identity):
            return "replaced_connection", (f"a frame that speaks for {peer.node} on a connection without its routing id "
                                           f"(one its reconnection took over, or a socket that is not {peer.node})")
        if peer.identity is None:
            return None  # a member we only heard of: its first frame binds it (see may_bind)
        if identity != peer.identity:
            return "impersonation", f"a frame that speaks for {peer.node} on a connection it did not join on"
        if peer.principal != principal:
            return "impersonation", (f"a frame that speaks for {peer.node} (key {peer.principal!r}) under the key "
                                     f"{principal!r}")
        return None

    # -- rights ------------------------------------------------------------------------------------

    def may_join(self, hello: wire.Hello, principal: str | None, replaces: list[Peer]) -> str | None:
        """None when a hello may be taken: its key may serve what it claims, and it replaces only
        an incarnation of the same key at its endpoint."""
        for old in replaces:
            if old.principal != principal:
                return (f"{hello.node} claims the endpoint of {old.node} (key {old.principal!r}) under the key "
                        f"{principal!r}")
        if self.policy is None or hello.service is None:
            return None  # (a client's key was admitted at its handshake; its rights are checked per message)
        return self.policy().may_serve(principal, hello.service.name)

    def may_bind(self, peer: Peer, principal: str | None) -> str | None:
        """None when the first frame of a member we only heard of (by gossip) may bind it to its
        connection and key: with keys, that key must be allowed to serve what the member claims."""
        if self.policy is None or peer.service_name is None:
            return None
        return self.policy().may_serve(principal, peer.service_name)

    def may_gossip(self, principal: str | None) -> bool:
        """Whether a node's word about the declared system counts: with keys, only a key that may
        serve some service (a client key's hello says nothing of the system)."""
        if self.policy is None:
            return True
        perms = self.policy().permissions(principal)
        return perms is not None and bool(perms.serves)

    def may_send(self, peer: Peer, type_name: str, kind: int) -> str | None:
        """May ``peer`` put an envelope of ``type_name`` on its channel to this node (keys only;
        the engine asks once per channel and type)?"""
        if kind == wire.KIND_HANDOVER:
            mine = self.service
            if mine is None or peer.service_name != mine.name:
                return f"a hand-over from {peer.node}, which is not an instance of this service"
            return None
        if peer.service is not None:
            if type_name in _outputs(peer.service):
                return None
            mine = self.service
            if mine is not None and peer.service_name == mine.name and type_name in _inputs(mine):
                return None  # forwarded by another instance of this service during a move
            return f"{peer.node} (service {peer.service_name}) sent {type_name}, which its declarations do not produce"
        assert self.policy is not None
        return self.policy().may_originate(peer.principal, type_name)

    def rightful(self, ch: InChannel, released: list[Any], refuse: Callable[[InChannel, Any, str, str], None]) -> list[Any]:
        """With keys: the envelopes this channel's key may send; the others go to ``refuse(ch, env,
        reason, detail)`` (completed, counted, and answered with the reason when they are commands
        or queries). Verdicts are cached per channel (``ch.rights``)."""
        verdicts = ch.rights
        kept = []
        for env in released:
            verdict = verdicts.get((env.type, env.kind), 0)
            if verdict == 0:
                verdict = verdicts[(env.type, env.kind)] = self.may_send(ch.peer, env.type, env.kind)
            if verdict is None:
                kept.append(env)
            else:
                refuse(ch, env, "not_allowed", verdict)
        return kept

    def may_call(self, principal: str | None, method: str) -> str | None:
        """May a client call the system query ``method``? (Always, without keys.)"""
        if self.policy is None:
            return None
        return self.policy().may_call(principal, method)

    def conflict_counts(self, peer: Peer | None, principal: str | None, detail: str) -> bool:
        """Whether a REFUSE "conflict" should stop this node: only when it comes from a node of the
        mesh that this node knows, or with keys from a key that may serve some service."""
        if peer is not None and peer.live:
            return True
        return self.policy is not None and self.may_gossip(principal)
