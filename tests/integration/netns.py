"""Hosts of our own for multi-host tests: network namespaces joined by veth to one bridge.

    with Hosts(3) as hosts:            # namespaces choreo-<pid>-1..3 at 10.<n>.0.11..13
        hosts.address(1)               # '10.<n>.0.11'; the test process itself is 10.<n>.0.1
        hosts.cut(1, 2); hosts.heal()  # a firewall rule (nftables) inside the namespaces
        hosts.isolate(3); hosts.heal(3)  # host 3 cut from everything, then back

Everything is created by the test and removed after it; traffic never leaves the machine.
``require_netns()`` skips the test with the reason when namespaces cannot be made here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import pytest

_probe: str | None = None


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30, check=check)


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    global _probe
    if _probe is not None:
        return _probe or None
    reason = ""
    if os.geteuid() != 0:
        reason = "network namespaces need root (ip netns add)"
    elif shutil.which("ip") is None:
        reason = "iproute2 ('ip') is not installed"
    else:
        name = f"choreo-probe-{os.getpid()}"
        made = _run("ip", "netns", "add", name, check=False)
        if made.returncode != 0:
            reason = f"cannot create a network namespace: {made.stderr.strip()}"
        else:
            _run("ip", "netns", "del", name, check=False)
    _probe = reason
    return reason or None


def require_netns() -> None:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)


class Hosts:
    """``count`` namespaces on a private bridge (see the module docstring)."""

    def __init__(self, count: int) -> None:
        require_netns()
        self.count = count
        tag = os.getpid() % 100_000
        self.subnet = f"10.{200 + tag % 50}.{tag % 250}"
        self.bridge = f"chbr{tag}"
        self.names = [f"choreo-{tag}-{i}" for i in range(1, count + 1)]
        self._veths: list[str] = []

    @property
    def gateway(self) -> str:
        """The address of the test process itself on the bridge."""
        return f"{self.subnet}.1"

    def address(self, host: int) -> str:
        return f"{self.subnet}.{10 + host}"

    def namespace(self, host: int) -> str:
        return self.names[host - 1]

    def __enter__(self) -> Hosts:
        try:
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _run("ip", "link", "set", self.bridge, "up")
            for i, ns in enumerate(self.names, start=1):
                veth = f"{self.bridge}v{i}"
                _run("ip", "netns", "add", ns)
                _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
                self._veths.append(veth)
                _run("ip", "link", "set", veth, "master", self.bridge)
                _run("ip", "link", "set", veth, "up")
                _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
                _run("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
                _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
                # like a host on a LAN: its default route leaves by eth0 (the bridge: nothing goes further)
                _run("ip", "netns", "exec", ns, "ip", "route", "add", "default", "via", self.gateway)
        except subprocess.CalledProcessError as exc:
            self.__exit__()
            pytest.skip(f"cannot build the test hosts: {' '.join(exc.cmd)}: {exc.stderr.strip()}")
        return self

    def __exit__(self, *exc: Any) -> None:
        for ns in self.names:
            _run("ip", "netns", "del", ns, check=False)
        for veth in self._veths:
            _run("ip", "link", "del", veth, check=False)
        _run("ip", "link", "del", self.bridge, check=False)

    def cut(self, a: int, b: int) -> None:
        """Drop every packet between hosts ``a`` and ``b``, by a firewall rule inside each."""
        for me, other in ((a, b), (b, a)):
            self._nft(me, "table inet choreo_cut {\n"
                          "  chain input { type filter hook input priority 0; ip saddr %s drop; }\n"
                          "  chain output { type filter hook output priority 0; ip daddr %s drop; }\n"
                          "}\n" % (self.address(other), self.address(other)))

    def isolate(self, host: int) -> None:
        """Drop every packet between ``host`` and the rest of the network (the other hosts and the
        test process), by a firewall rule inside it; :meth:`heal` lifts it."""
        self._nft(host, "table inet choreo_cut {\n"
                        '  chain input { type filter hook input priority 0; iifname "eth0" drop; }\n'
                        '  chain output { type filter hook output priority 0; oifname "eth0" drop; }\n'
                        "}\n")

    def _nft(self, host: int, rules: str) -> None:
        if shutil.which("nft") is None:
            pytest.skip("nftables ('nft') is not installed: cannot partition the hosts with a firewall rule")
        subprocess.run(["ip", "netns", "exec", self.namespace(host), "nft", "-f", "-"], input=rules,
                       text=True, check=True, capture_output=True, timeout=30)

    def heal(self, *hosts: int) -> None:
        """Lift the rules of :meth:`cut` and :meth:`isolate`, inside ``hosts`` (default: all)."""
        for ns in [self.namespace(h) for h in hosts] or self.names:
            _run("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "choreo_cut", check=False)
