"""Endpoints: what one looks like, and the address a node tells its peers to dial.

How this works: :func:`check_endpoint` accepts the forms ZeroMQ binds and connects
(``tcp://HOST:PORT``, ``ipc://PATH``, ``inproc://NAME``) and refuses anything else with one line
that shows the expected form, and the likely fix (``127.0.0.1:7510`` -> ``tcp://127.0.0.1:7510``).

:func:`advertised` picks the endpoint a node advertises. A node bound to a wildcard address
(``tcp://0.0.0.0:7001``, ``tcp://*:7001``) cannot advertise what it bound: it advertises the
address of its interface that routes to its seeds (asked of the kernel with a UDP socket that
sends nothing), or, with no seed off this host, the one that routes off the host: a wildcard
bind answers on every interface, so peers on this host reach that address too. Only when no
interface but loopback exists does it advertise ``127.0.0.1``, with a warning that says so and
names ``--advertise``. A node whose advertised address is loopback while a seed is on another
host is warned about too, by name: that seed, and every peer there, cannot dial back::

    advertised("tcp://0.0.0.0:7001", seeds=["tcp://10.0.0.5:7000"])   # 'tcp://10.0.0.7:7001'
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

__all__ = [
    "check_endpoint",
    "endpoint_problem",
    "split_endpoint",
    "advertised",
    "route_to",
    "is_loopback",
    "only_this_host",
    "MAX_ENDPOINT",
]

log = logging.getLogger("choreo.transport")

WILDCARDS = ("0.0.0.0", "::", "*", "")
_OFF_HOST = "192.0.2.1"  # TEST-NET-1 (RFC 5737): never answered, only asked which interface routes there


MAX_ENDPOINT = 300  # characters of one endpoint, key name included
_KEY = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_HOST = r"(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\*)"
_TCP = re.compile(rf"(?:({_KEY})@)?tcp://({_HOST}):([0-9]{{1,5}})")
_LOCAL = re.compile(rf"(?:({_KEY})@)?(?:ipc://[^\x00-\x20\x7f]{{1,107}}|inproc://[^\x00-\x20\x7f]{{1,255}})")


def split_endpoint(endpoint: str) -> tuple[str | None, str]:
    """``(key name or None, ZeroMQ address)`` of an endpoint (no validation: see :func:`endpoint_problem`).

    >>> split_endpoint("orders-1@tcp://10.0.0.5:7001")
    ('orders-1', 'tcp://10.0.0.5:7001')
    >>> split_endpoint("tcp://127.0.0.1:7000")
    (None, 'tcp://127.0.0.1:7000')
    """
    at = endpoint.find("@")
    scheme = endpoint.find("://")
    if 0 < at and (scheme < 0 or at < scheme):
        return endpoint[:at], endpoint[at + 1 :]
    return None, endpoint


def endpoint_problem(endpoint: object, *, bind: bool = False) -> str | None:
    """None if ``endpoint`` is one a node may be dialled at, else what is wrong with it.

    ``tcp://HOST:PORT`` (HOST a name, an IPv4 address or a bracketed IPv6 one; PORT 1..65535),
    ``ipc://PATH`` or ``inproc://NAME``, optionally ``KEY@`` in front; ``bind=True`` also
    allows the wildcard host ``*`` and port 0 (any free port).

    >>> endpoint_problem("tcp://127.0.0.1:99999")
    'port 99999 out of range 1..65535 in tcp://127.0.0.1:99999'
    """
    if not isinstance(endpoint, str):
        return f"an endpoint is a string, got {type(endpoint).__name__}"
    if len(endpoint) > MAX_ENDPOINT:
        return f"endpoint of {len(endpoint)} characters (at most {MAX_ENDPOINT})"
    m = _TCP.fullmatch(endpoint)
    if m is not None:
        port = int(m.group(3))
        if not (0 if bind else 1) <= port <= 65535:
            return f"port {port} out of range {0 if bind else 1}..65535 in {endpoint}"
        if m.group(2) == "*" and not bind:
            return f"{endpoint} names no host to dial (the wildcard * only binds)"
        return None
    if _LOCAL.fullmatch(endpoint):
        return None
    return f"{endpoint!r} is not tcp://HOST:PORT, ipc://PATH or inproc://NAME (optionally KEY@ in front)"


def check_endpoint(value: str, what: str = "endpoint", *, bind: bool = False) -> str:
    """``value`` when it is a ZeroMQ endpoint; ValueError in one line with the expected form otherwise.

    ``bind``: the endpoint is bound (a wildcard host and ``*`` or 0 as port are allowed).

    >>> check_endpoint("tcp://127.0.0.1:7000")
    'tcp://127.0.0.1:7000'
    >>> check_endpoint("127.0.0.1:7510", "--peer")
    Traceback (most recent call last):
    ValueError: --peer must look like tcp://HOST:PORT (or ipc://PATH), got '127.0.0.1:7510': did you mean tcp://127.0.0.1:7510?
    """
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string like tcp://HOST:PORT, got {type(value).__name__}")
    key, _ = split_endpoint(value)
    if key is not None:  # a secure node's address: KEY@tcp://HOST:PORT
        check_endpoint(value[len(key) + 1 :], what, bind=bind)
        problem = endpoint_problem(value, bind=bind)
        if problem is not None:
            raise ValueError(f"{what}: {problem}")
        return value
    form = "tcp://HOST:PORT (or ipc://PATH)"
    scheme, sep, rest = value.partition("://")
    if not sep:
        guess = f": did you mean tcp://{value}?" if ":" in value and value.rsplit(":", 1)[1].isdigit() else ""
        raise ValueError(f"{what} must look like {form}, got {value!r}{guess}")
    if scheme in ("ipc", "inproc"):
        if not rest:
            raise ValueError(f"{what} must look like {form}, got {value!r}: the path is missing")
        return value
    if scheme != "tcp":
        raise ValueError(f"{what} must look like {form}, got {value!r}: choreo speaks tcp://, ipc:// and inproc://")
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        raise ValueError(f"{what} must look like {form}, got {value!r}: the port is missing")
    if bind and port in ("*", "0"):
        return value
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} must look like {form} with a port in 1..65535, got {value!r}")
    if host.strip("[]") in WILDCARDS and not bind:
        raise ValueError(f"{what} must name a host to dial, got {value!r}: {host} is a wildcard")
    return value


def is_loopback(host: str) -> bool:
    """``127.x.x.x``, ``::1`` and ``localhost``.

    >>> is_loopback("127.0.0.1"), is_loopback("10.0.0.1"), is_loopback("localhost")
    (True, False, True)
    """
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def only_this_host(endpoint: str) -> bool:
    """True when only this host can reach ``endpoint``: tcp on 127.0.0.0/8, ::1 or ``localhost``; ipc; inproc.

    >>> only_this_host("tcp://127.0.0.1:0"), only_this_host("tcp://0.0.0.0:7000"), only_this_host("ipc:///tmp/n")
    (True, False, True)
    """
    _, address = split_endpoint(endpoint)
    if not address.startswith("tcp://"):
        return address.startswith(("ipc://", "inproc://"))
    return is_loopback(address[len("tcp://") :].rpartition(":")[0])


def route_to(host: str, port: int = 9, family: int | None = None) -> str | None:
    """The address of this host's interface that routes to ``host`` (None when nothing does)."""
    try:
        infos = socket.getaddrinfo(host, port, family or 0, socket.SOCK_DGRAM)
    except OSError:
        return None
    for fam, _, _, _, addr in infos:
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            try:
                s.connect(addr)  # UDP: sets the route, sends nothing
                return str(s.getsockname()[0])
            except OSError:
                continue
    return None


def _host_port(endpoint: str) -> tuple[str, int | None]:
    parts = urlsplit(endpoint)
    try:
        return parts.hostname or "", parts.port
    except ValueError:
        return parts.hostname or "", None


def advertised(bound: str, seeds: Iterable[str] = (), advertise: str | None = None) -> str:
    """The endpoint peers should dial for a node bound at ``bound`` (see the module docstring)."""
    seeds = [s for s in seeds if s.startswith("tcp://")]
    if advertise is not None:
        endpoint = advertise
    else:
        parts = urlsplit(bound)
        host = (parts.hostname or "") if parts.scheme == "tcp" else None
        if host is None or host not in WILDCARDS:
            endpoint = bound
        else:
            family = socket.AF_INET6 if host == "::" else socket.AF_INET
            routes = [route_to(h, p or 9, family) for h, p in map(_host_port, seeds)]
            chosen = next((r for r in routes if r and not is_loopback(r)), None)
            if chosen is None:  # no seed, or seeds on this host: the interface other hosts would reach
                chosen = route_to("2001:db8::1" if family == socket.AF_INET6 else _OFF_HOST, 9, family)
            if chosen is None or is_loopback(chosen):
                chosen = "::1" if family == socket.AF_INET6 else "127.0.0.1"
                log.warning(
                    "bound to the wildcard address %s and no interface routes off this host: advertising "
                    "loopback, so only nodes on this host can dial it; pass --advertise tcp://HOST:PORT "
                    "(advertise= in Python) with an address the other hosts reach",
                    bound,
                )
            endpoint = f"tcp://{f'[{chosen}]' if ':' in chosen else chosen}:{parts.port}"
            if not is_loopback(chosen):
                log.info("bound to the wildcard address %s: advertising %s (the interface that routes to %s)",
                         bound, endpoint, ", ".join(seeds) or "other hosts")  # fmt: skip
    host, _ = _host_port(endpoint)
    if is_loopback(host):
        remote = [s for s in seeds if not is_loopback(_host_port(s)[0])]
        if remote:
            log.warning(
                "advertising %s, a loopback address, while joining through %s: %s and every peer on another "
                "host cannot dial back to this node; bind an address they reach (--bind tcp://0.0.0.0:PORT) "
                "or pass --advertise tcp://HOST:PORT",
                endpoint, ", ".join(remote), "it" if len(remote) == 1 else "they",
            )  # fmt: skip
    return endpoint
