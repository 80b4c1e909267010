"""Services for multi-process tests that record what they handle in per-process files.

Each handler appends ``type key n`` lines to ``$CHOREO_RECORD_DIR/<service>-<pid>.log``
(line-buffered, so a SIGKILL loses at most the line being written). The test reads every file
after the run: the ground truth of what was processed, independent of the system under test.
"""

from __future__ import annotations

import asyncio
import os
import time

import msgspec

from choreo import Command, Event, Query, Service


class Produced(Event, key="k"):
    k: str
    n: int


class Relayed(Event, key="k"):
    k: str
    n: int


_files: dict[str, object] = {}


def record(service: str, line: str) -> None:
    f = _files.get(service)
    if f is None:
        directory = os.environ["CHOREO_RECORD_DIR"]
        f = _files[service] = open(os.path.join(directory, f"{service}-{os.getpid()}.log"), "a", buffering=1)
    f.write(line + "\n")  # type: ignore[attr-defined]


audit = Service("audit")


@audit.on(Produced)
def audit_produced(ev: Produced) -> None:
    record("audit", f"Produced {ev.k} {ev.n}")


relay = Service("relay")


@relay.on(Produced, emits=[Relayed])
def relay_produced(ev: Produced, ctx) -> None:
    record("relay", f"Produced {ev.k} {ev.n}")
    ctx.emit(Relayed(k=ev.k, n=ev.n))


stats = Service("stats")


@stats.on(Produced)
def stats_produced(ev: Produced) -> None:
    record("stats", f"Produced {ev.k} {ev.n}")


@stats.on(Relayed)
def stats_relayed(ev: Relayed) -> None:
    record("stats", f"Relayed {ev.k} {ev.n}")


def read_records(directory: str, service: str) -> list[tuple[str, str, int, str]]:
    """Every recorded line of a service: (type, key, n, file)."""
    out = []
    for name in sorted(os.listdir(directory)):
        if name.startswith(service + "-") and name.endswith(".log"):
            with open(os.path.join(directory, name)) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 3:
                        out.append((parts[0], parts[1], int(parts[2]), name))
    return out


# --- commands: the article's flaky mobile client -------------------------------------------

class OrderAccepted(msgspec.Struct, frozen=True):
    order_id: str
    attempt_request_id: str


class PlaceOrder(Command, idempotency=["customer_id", "cart_id"], returns=OrderAccepted):
    """A request id per HTTP attempt is in the body, but not in the idempotency key."""

    customer_id: str
    cart_id: str
    request_id: str


class OrderCount(Query):
    customer_id: str


orders = Service("orders")
_placed: dict[str, int] = {}


@orders.command(PlaceOrder)
def place_order(cmd: PlaceOrder) -> OrderAccepted:
    n = _placed[cmd.customer_id] = _placed.get(cmd.customer_id, 0) + 1
    record("orders", f"PlaceOrder {cmd.customer_id}/{cmd.cart_id} {n}")
    return OrderAccepted(order_id=f"order-{cmd.cart_id}", attempt_request_id=cmd.request_id)


@orders.query(OrderCount)
def order_count(q: OrderCount) -> int:
    return _placed.get(q.customer_id, 0)


# --- a slow consumer: one key, so one event at a time -----------------------------------------

class Work(Event, key="k"):
    k: str
    n: int


slow = Service("slow")


@slow.on(Work)
async def slow_work(ev: Work) -> None:
    await asyncio.sleep(float(os.environ.get("CHOREO_SLOW_DELAY", "0.005")))
    record("slow", f"Work {ev.k} {ev.n}")


# --- elastic membership: a keyed consumer that records when it handled what ------------------

elastic = Service("elastic")


@elastic.on(Produced)
def elastic_produced(ev: Produced) -> None:
    record("elastic", f"Produced {ev.k} {ev.n} {time.time_ns()}")


# --- a pipeline of two keyed stages: what the first emits, the second handles once ---------------

forward = Service("forward")


@forward.on(Produced, emits=[Relayed])
def forward_produced(ev: Produced, ctx) -> None:
    record("forward", f"Produced {ev.k} {ev.n} {time.time_ns()}")
    ctx.emit(Relayed(k=ev.k, n=ev.n))  # (its id is derived from the input's: a rerun emits the same)


sink = Service("sink")


@sink.on(Relayed)
def sink_relayed(ev: Relayed) -> None:
    record("sink", f"Relayed {ev.k} {ev.n} {time.time_ns()}")


# --- commands under faults: a keyed command whose id is its fields, answered with a result ------


class Add(Command, key="k", idempotency=["k", "n"], returns=int):
    k: str
    n: int


counter = Service("counter")


@counter.command(Add)
def counter_add(cmd: Add) -> int:
    record("counter", f"Add {cmd.k} {cmd.n} {time.time_ns()}")
    return cmd.n * 2


# --- the same, with state per key and a standby copy of it (every write waits for the standby) ---


class Seen(msgspec.Struct):
    n: int


tally = Service("tally", state=[Seen], replicas=1)


@tally.on(Produced)
def tally_produced(ev: Produced, ctx) -> None:
    record("tally", f"Produced {ev.k} {ev.n} {time.time_ns()}")
    ctx.state.put(Seen(ev.n))


def read_timed(directory: str, service: str) -> list[tuple[str, int, int, str]]:
    """(key, n, time_ns, file) of every complete line (a SIGKILL may cut the last one)."""
    out = []
    for name in sorted(os.listdir(directory)):
        if name.startswith(service + "-") and name.endswith(".log"):
            with open(os.path.join(directory, name)) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 4 and line.endswith("\n"):
                        out.append((parts[1], int(parts[2]), int(parts[3]), name))
    return out
