"""Starting nodes from Python: as subprocesses (tests, examples, notebooks) or in this process.

A subprocess node gets its service definition through cloudpickle (so a service defined in a
test module or a notebook cell needs no importable module), prints one ready line with its
endpoint, and is driven through a :class:`NodeProcess` handle::

    with NodeProcess(orders, peers=[seed]) as proc:     # started, ready, stopped on exit
        print(proc.endpoint)
        proc.stop()      # SIGTERM: drain, then leave
        # or proc.kill() # SIGKILL: a crash

``data_dir=`` makes the child durable (see :class:`choreo.node.Node`): killed and started again
on the same dir, it keeps its name and what it had committed.

Classes and functions from importable modules travel by reference (the child gets the
parent's ``sys.path``); those defined in ``__main__`` or a notebook travel by value. Message
types are msgspec structs, whose fields must exist when the class is created, so they get a
reducer of their own that rebuilds them from their fields and options.

cloudpickle is used only here, between a parent and the child it spawned, over a pipe: bytes
from the network are never unpickled.
"""

from __future__ import annotations

import io
import os
import pickle
import select
import signal
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import cloudpickle
import msgspec

from .config import NodeConfig
from .messages import Command, Event, Message, Query
from .service import Service
from .trust import Security

__all__ = ["NodeProcess", "READY_PREFIX", "stop_all"]

READY_PREFIX = "choreo-ready "


class NodeProcess:
    """A node running in a child process (see the module docstring)."""

    def __init__(
        self,
        service: Service | str | None,
        *,
        bind: str = "tcp://127.0.0.1:0",
        peers: Iterable[str] = (),
        config: NodeConfig | None = None,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        log_level: str = "WARNING",
        start: bool = True,
        ready_timeout: float = 30.0,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        netns: str | None = None,
        security: Security | None = None,
        insecure: bool = False,
        data_dir: str | os.PathLike[str] | None = None,
        fsync: str = "batch",
        fsync_interval: float = 0.1,
    ) -> None:
        self.service = service
        self.bind = bind
        self.peers = list(peers)
        self.config = config or NodeConfig()
        self.name = name
        self.env = dict(env or {})
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint: str | None = None
        self.node_name: str | None = None
        self.metrics_port = metrics_port  # None: the node opens no metrics port; 0: a free one
        self.metrics_host = metrics_host
        self.metrics_url: str | None = None  # http://HOST:PORT/metrics once started with metrics_port
        self.stderr_path: str | None = None
        self.netns = netns  # run inside this network namespace (ip netns exec), a host of its own
        self.security = security  # the child's key pair and trusted keys, over the same private pipe
        self.insecure = insecure
        self.data_dir = os.fspath(data_dir) if data_dir is not None else None
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        if start:
            self.start(ready_timeout)

    def start(self, timeout: float = 30.0) -> NodeProcess:
        """Spawn the child and wait for its ready line (otherwise TimeoutError with its stderr and,
        when it exited, its exit status)."""
        if self.proc is not None:
            raise RuntimeError("already started")
        payload = dumps(
            {
                "service": self.service,
                "bind": self.bind,
                "peers": self.peers,
                "config": asdict(self.config),
                "name": self.name,
                "log_level": self.log_level,
                "metrics_port": self.metrics_port,
                "metrics_host": self.metrics_host,
                "security": self.security,
                "insecure": self.insecure,
                "data_dir": self.data_dir,
                "fsync": self.fsync,
                "fsync_interval": self.fsync_interval,
            }
        )
        fd, self.stderr_path = tempfile.mkstemp(prefix="choreo-node-", suffix=".log")
        os.close(fd)
        path = os.pathsep.join(p for p in sys.path if p)
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
        with open(self.stderr_path, "wb") as err:
            prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "choreo._worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                start_new_session=True,
            )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(payload)
        self.proc.stdin.close()
        deadline = time.monotonic() + timeout
        line = b""
        eof = False
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                eof = True
                break
            line += chunk
            if b"\n" in line:
                break
        text = line.decode(errors="replace").strip()
        if not text.startswith(READY_PREFIX):
            try:  # its stdout closed: it is exiting, and its status says more than a timeout would
                status = self.proc.wait(1.0) if eof else self.proc.poll()
            except subprocess.TimeoutExpired:
                status = None
            self.kill()
            what = (f"exited with status {status} before it was ready" if status is not None
                    else f"did not become ready within {timeout:.0f} s")
            raise TimeoutError(f"node process {what}: {self.stderr()[-2000:]}")
        fields = text[len(READY_PREFIX) :].split()
        self.endpoint = fields[0]
        self.node_name = fields[1] if len(fields) > 1 else None
        for extra in fields[2:]:
            if extra.startswith("metrics="):
                self.metrics_url = extra[len("metrics=") :]
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful: drain and leave), then wait; SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL: a crash, no drain, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def stderr(self) -> str:
        if self.stderr_path is None:
            return ""
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop(timeout=15)
        self.kill()
        if self.stderr_path:
            try:
                os.unlink(self.stderr_path)
            except OSError:
                pass


class _Pickler(cloudpickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, type) and issubclass(obj, Message) and "__choreo_options__" in obj.__dict__:
            module = sys.modules.get(obj.__module__)
            if module is None or obj.__module__ == "__main__" or getattr(module, obj.__qualname__, None) is not obj:
                return _rebuild_message_class, _message_class_state(obj)
        return super().reducer_override(obj)


def stop_all(procs: Iterable[NodeProcess], timeout: float = 30.0) -> None:
    """Stop every process at once, as an operator stops a system: SIGTERM to all (each drains and
    leaves while the others still run), SIGKILL to what outlives ``timeout``.

    >>> stop_all([])  # (nothing started: nothing to do)
    """
    started = [p for p in procs if p.proc is not None]
    if not started:
        return

    def stop(p: NodeProcess) -> None:
        try:
            p.stop(timeout=timeout)
        finally:
            p.kill()  # (a no-op when it exited)

    with ThreadPoolExecutor(max_workers=len(started)) as pool:
        list(pool.map(stop, started))


def dumps(obj: Any) -> bytes:
    """cloudpickle, plus by-value message types (see the module docstring)."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.DEFAULT_PROTOCOL).dump(obj)
    return buf.getvalue()


_PRIMITIVES = {"event": Event, "command": Command, "query": Query}


def _message_class_state(cls: type[Message]) -> tuple[Any, ...]:
    options = cls.__choreo_options__
    fields = []
    for f in msgspec.structs.fields(cls):
        default = None if f.default is msgspec.NODEFAULT else f.default
        factory = None if f.default_factory is msgspec.NODEFAULT else f.default_factory
        fields.append((f.name, f.type, f.default is not msgspec.NODEFAULT, default, factory))
    kwargs = {
        "name": options.name,
        "key": options.key,
        "idempotency": options.idempotency,
        "dedup_ttl": options.dedup_ttl,
        "dedup_max": options.dedup_max,
        "returns": options.returns,
    }
    return (options.kind, cls.__name__, cls.__qualname__, cls.__module__, cls.__doc__, fields, kwargs)


def _rebuild_message_class(kind: str, name: str, qualname: str, module: str, doc: str | None, fields: list[Any], kwargs: dict[str, Any]) -> type:
    namespace: dict[str, Any] = {"__module__": module, "__qualname__": qualname, "__doc__": doc, "__annotations__": {}}
    for fname, ftype, has_default, default, factory in fields:
        namespace["__annotations__"][fname] = ftype
        if factory is not None:
            namespace[fname] = msgspec.field(default_factory=factory)
        elif has_default:
            namespace[fname] = default
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return types.new_class(name, (_PRIMITIVES[kind],), kwargs, lambda ns: ns.update(namespace))
