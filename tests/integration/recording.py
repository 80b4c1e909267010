"""Services for multi-process tests that record what they handle in per-process files.

Each handler appends ``type key n`` lines to ``$CHOREO_RECORD_DIR/<service>-<pid>.log``
(line-buffered, so a SIGKILL loses at most the line being written). The test reads every file
after the run: the ground truth of what was processed, independent of the system under test.
"""

from __future__ import annotations

import os

from choreo import Event, Service


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
