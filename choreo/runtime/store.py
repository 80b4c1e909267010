"""The node-local store of a durable node: one small interface, two implementations.

A durable node (``Node(..., data_dir=...)``) keeps in one embedded store:

* its **identity**: its service, its name (a restarted node keeps it) and how many lives it had;
* its **outbox**: what it originated or a handler emitted, until every consuming service
  acknowledged it. A row is a batch body as it went on the wire to one receiver (the runtime
  writes batches, not messages: a row costs what ~256 messages share), or one envelope while it
  waits outside a window (for credit, for a partition's old owner, for an instance);
* the **dedup ids** of the messages it handled (a row per commit and message type: their ids
  packed), **cached command results**, **dead letters**, and the **declared system** it knows;
* its handler **state** by key, and the **epoch** of each partition it holds (which of two
  stores holding one partition is newer: see :mod:`~choreo.runtime.ownership`). A store from
  before epochs gains their table when opened, empty.

The runtime (:mod:`~choreo.runtime.journal`) decides what goes in each :class:`Batch`;
:meth:`Store.write` applies one batch as one transaction, durable by the store's fsync policy
when it returns, or raises :class:`~choreo.errors.StoreFull` / :class:`~choreo.errors.StoreError`
having changed nothing. :meth:`Store.load` returns what a restarted node finds (a
:class:`Snapshot`). :class:`MemoryStore` keeps everything in dicts (the runtime's tests: a
"disk" that outlives the engines written on it); :class:`SqliteStore` keeps it in SQLite in WAL
mode (stdlib ``sqlite3``) in the node's data dir, locked while a node uses it::

    >>> store = MemoryStore().open(service="orders", name=None)
    >>> store.identity.name.startswith("orders#"), store.identity.lives
    (True, 1)
    >>> store.write(Batch(outbox_put=[(1, "payments", b"...", 0)]))
    >>> [row for row, *_ in store.load().outbox]
    [1]
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import quote

from ..errors import DataDirError, StoreError, StoreFull

__all__ = [
    "FORMAT",
    "FSYNC_POLICIES",
    "STORE_FILE",
    "Batch",
    "MemoryStore",
    "Snapshot",
    "SqliteStore",
    "Store",
    "StoredIdentity",
]

FORMAT = 1  # the layout of the tables below; a store of a newer format is refused, never rewritten
FSYNC_POLICIES = ("batch", "interval", "off")
STORE_FILE = "store.sqlite3"
LOCK_FILE = "LOCK"

#: outbox row: (row, service, body, acked): ``body`` holds envelopes; those with a sequence number at
#: or below ``acked`` were acknowledged (a batch whose receiver acknowledged only its first part)
OutboxRow = tuple[int, str, bytes, int]
#: dedup row: (row, message type, wall time, expires at, entries: n x 16-byte id then n x u16 partition)
DedupRow = tuple[int, str, float, float, bytes]
#: cached command result: (message id, wall time, expires at, partition, encoded reply)
ResultRow = tuple[bytes, float, float, int, bytes]
#: handler state: (state type, key, partition, body)
StateRow = tuple[str, bytes, int, bytes]


@dataclass(frozen=True)
class StoredIdentity:
    """Who the node on this store is: it keeps its name across restarts; ``lives`` counts them."""

    service: str | None
    name: str
    lives: int


@dataclass
class Snapshot:
    """What a restarted node finds in its store."""

    identity: StoredIdentity
    outbox: list[OutboxRow] = field(default_factory=list)  # in row order: the order they were sent in
    dedup: list[DedupRow] = field(default_factory=list)
    results: list[ResultRow] = field(default_factory=list)
    letters: list[tuple[int, bytes]] = field(default_factory=list)  # (id, encoded dead letter)
    system: bytes | None = None  # the declared system, encoded
    state: list[StateRow] = field(default_factory=list)  # handler state (ctx.state)
    epochs: list[tuple[int, int]] = field(default_factory=list)  # (partition, epoch of its copy here)


@dataclass
class Batch:
    """One transaction: rows to put and rows to delete (what changed since the last commit)."""

    outbox_put: list[OutboxRow] = field(default_factory=list)
    outbox_acked: list[tuple[int, int]] = field(default_factory=list)  # (acked, row)
    outbox_del: list[int] = field(default_factory=list)
    dedup_put: list[DedupRow] = field(default_factory=list)
    dedup_del: list[int] = field(default_factory=list)
    results_put: list[ResultRow] = field(default_factory=list)
    results_del: list[bytes] = field(default_factory=list)
    letters_put: list[tuple[int, bytes]] = field(default_factory=list)
    letters_del: list[int] = field(default_factory=list)
    state_drop: list[int] = field(default_factory=list)  # partitions whose state left (or is replaced)
    state_del: list[tuple[str, bytes]] = field(default_factory=list)  # (state type, key)
    state_put: list[StateRow] = field(default_factory=list)
    epochs_del: list[int] = field(default_factory=list)  # partitions whose copy left
    epochs_put: list[tuple[int, int]] = field(default_factory=list)  # (partition, epoch)
    system: bytes | None = None

    def rows(self) -> int:
        """How many rows this batch writes or deletes."""
        return sum(len(v) for v in vars(self).values() if isinstance(v, list)) + (self.system is not None)


class Store(Protocol):
    """What the runtime needs of a store (see the module docstring)."""

    path: str  # where it is, for messages
    fsync: str  # "batch", "interval" or "off"
    interval: float  # seconds between syncs under fsync="interval"
    identity: StoredIdentity

    def load(self) -> Snapshot: ...

    def write(self, batch: Batch) -> None: ...

    def sync(self) -> None: ...

    def outbox_rows(self) -> list[int]: ...

    def size(self) -> int: ...

    def used(self) -> int: ...

    def close(self) -> None: ...


def _check_policy(fsync: str, interval: float) -> None:
    if fsync not in FSYNC_POLICIES:
        raise ValueError(f"fsync must be one of {', '.join(map(repr, FSYNC_POLICIES))}, got {fsync!r}")
    if not interval > 0:
        raise ValueError(f"fsync_interval must be > 0 seconds, got {interval!r}")


def _new_name(service: str | None) -> str:
    return f"{service or 'client'}#{os.urandom(3).hex()}"


def _claimed(path: str, meta: dict[str, Any] | None, service: str | None, name: str | None) -> StoredIdentity:
    """The identity a node opening this store gets (DataDirError if the store is another node's)."""
    if meta is None:
        return StoredIdentity(service, name or _new_name(service), 1)
    owner = meta.get("name", "?")
    stored = meta.get("service") or None
    if stored != service:
        what = f"service {stored}" if stored else "a client"
        mine = f"service {service}" if service else "a client"
        raise DataDirError(
            f"data dir {path} belongs to {owner}, {what}, not to {mine}: give each node its own data dir "
            "(nothing was changed)"
        )
    if name is not None and name != owner:
        raise DataDirError(
            f"data dir {path} belongs to node {owner}, not {name}: a restarted node keeps its name "
            "(leave the name out, or give this node its own data dir; nothing was changed)"
        )
    return StoredIdentity(service, owner, int(meta.get("lives", 0)) + 1)


# ============================================================================================ memory


class MemoryStore:
    """The store in dicts: a "disk" that outlives the engines written on it (tests, the fake link).

    ``open()`` claims it like a data dir (a second open before ``close()`` is refused, as a
    locked data dir is); ``capacity`` (bytes) makes writes beyond it fail like a full disk. It
    models the OS too: :meth:`write` reaches the OS (a process that dies keeps it), :meth:`sync`
    puts what was written on disk, and :meth:`lose_power` forgets whatever was not synced::

        >>> store = MemoryStore().open(service=None, name="c")
        >>> store.write(Batch(outbox_put=[(1, "s", b"x", 0)])); store.lose_power()
        >>> store.load().outbox
        []
    """

    def __init__(self, path: str = "memory", capacity: int | None = None) -> None:
        self.path = path
        self.capacity = capacity
        self.fsync = "batch"
        self.interval = 0.1
        self.identity = StoredIdentity(None, "?", 0)
        self.meta: dict[str, Any] | None = None
        self.outbox: dict[int, OutboxRow] = {}
        self.dedup: dict[int, DedupRow] = {}
        self.results: dict[bytes, ResultRow] = {}
        self.letters: dict[int, bytes] = {}
        self.system: bytes | None = None
        self.state: dict[tuple[str, bytes], StateRow] = {}
        self.epochs: dict[int, int] = {}
        self.commits = 0
        self.syncs = 0
        self.is_open = False
        self._disk: tuple[Any, ...] = self._state()

    def _state(self) -> tuple[Any, ...]:
        return (dict(self.outbox), dict(self.dedup), dict(self.results), dict(self.letters), self.system, self.meta,
                dict(self.state), dict(self.epochs))

    def lose_power(self) -> None:
        """The machine lost power: what was written and not synced is gone (the node with it)."""
        outbox, dedup, results, letters, self.system, meta, state, epochs = self._disk
        self.outbox, self.dedup, self.results, self.letters = dict(outbox), dict(dedup), dict(results), dict(letters)
        self.state, self.epochs = dict(state), dict(epochs)
        self.meta = dict(meta) if meta is not None else None
        self.is_open = False

    def on_disk(self) -> Snapshot:
        """What a power failure now would leave (what :meth:`sync` last put on disk)."""
        outbox, dedup, results, letters, system, _, state, epochs = self._disk
        return Snapshot(self.identity, [outbox[k] for k in sorted(outbox)], [dedup[k] for k in sorted(dedup)],
                        list(results.values()), sorted(letters.items()), system, list(state.values()),
                        sorted(epochs.items()))

    def open(
        self, *, service: str | None, name: str | None, fsync: str = "batch", interval: float = 0.1
    ) -> MemoryStore:
        """Claim the store for a node (DataDirError if a node holds it, or it is another node's)."""
        _check_policy(fsync, interval)
        if self.is_open:
            raise DataDirError(f"data dir {self.path} is in use by another node (this process): one node per data dir")
        self.identity = _claimed(self.path, self.meta, service, name)
        self.meta = {"app": "choreo", "format": FORMAT, "service": service or "", "name": self.identity.name,
                     "lives": self.identity.lives}
        self.fsync, self.interval = fsync, interval
        self.is_open = True
        self.sync()  # the new life is on disk before the node says anything (as SqliteStore does)
        return self

    def load(self) -> Snapshot:
        return Snapshot(
            self.identity,
            [self.outbox[k] for k in sorted(self.outbox)],
            [self.dedup[k] for k in sorted(self.dedup)],
            list(self.results.values()),
            sorted(self.letters.items()),
            self.system,
            list(self.state.values()),
            sorted(self.epochs.items()),
        )

    def write(self, batch: Batch) -> None:
        if not self.is_open:
            raise StoreError(f"data dir {self.path}: the store is closed")
        if self.capacity is not None:
            grows = (sum(len(r[2]) for r in batch.outbox_put) + sum(len(r[4]) for r in batch.dedup_put)
                     + sum(len(r[1]) + len(r[3]) for r in batch.state_put))
            if self.size() + grows > self.capacity:
                raise StoreFull(self.path, "database or disk is full")
        for row in batch.outbox_del:
            self.outbox.pop(row, None)
        for row_ in batch.outbox_put:
            self.outbox[row_[0]] = row_
        for acked, row in batch.outbox_acked:
            if row in self.outbox:
                r = self.outbox[row]
                self.outbox[row] = (r[0], r[1], r[2], acked)
        for row in batch.dedup_del:
            self.dedup.pop(row, None)
        for d in batch.dedup_put:
            self.dedup[d[0]] = d
        for msg_id in batch.results_del:
            self.results.pop(msg_id, None)
        for res in batch.results_put:
            self.results[res[0]] = res
        for letter_id in batch.letters_del:
            self.letters.pop(letter_id, None)
        for letter_id, blob in batch.letters_put:
            self.letters[letter_id] = blob
        if batch.state_drop:
            dropped = set(batch.state_drop)
            self.state = {k: row for k, row in self.state.items() if row[2] not in dropped}
        for type_key in batch.state_del:
            self.state.pop(type_key, None)
        for row in batch.state_put:
            self.state[(row[0], row[1])] = row
        for p in batch.epochs_del:
            self.epochs.pop(p, None)
        self.epochs.update(batch.epochs_put)
        if batch.system is not None:
            self.system = batch.system
        self.commits += 1

    def sync(self) -> None:
        self.syncs += 1
        self._disk = self._state()

    def outbox_rows(self) -> list[int]:
        return list(self.outbox)

    def size(self) -> int:
        return (sum(len(r[2]) for r in self.outbox.values()) + sum(len(r[4]) for r in self.dedup.values())
                + sum(len(r[1]) + len(r[3]) for r in self.state.values()))

    def used(self) -> int:
        return self.size()

    def close(self) -> None:
        self.is_open = False


# ============================================================================================ SQLite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox(id INTEGER PRIMARY KEY, service TEXT NOT NULL, body BLOB NOT NULL,
                                  acked INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dedup(id INTEGER PRIMARY KEY, type TEXT NOT NULL, t REAL NOT NULL,
                                 expires REAL NOT NULL, entries BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS results(msg_id BLOB PRIMARY KEY, t REAL NOT NULL, expires REAL NOT NULL,
                                   partition INTEGER NOT NULL, reply BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS letters(id INTEGER PRIMARY KEY, letter BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS system(id INTEGER PRIMARY KEY CHECK (id = 1), spec BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS state(type TEXT NOT NULL, key BLOB NOT NULL, partition INTEGER NOT NULL,
                                 body BLOB NOT NULL, PRIMARY KEY (type, key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS state_partition ON state(partition);
CREATE TABLE IF NOT EXISTS epochs(partition INTEGER PRIMARY KEY, epoch INTEGER NOT NULL);
"""


#: how a Batch is written: (its field, the statement, whether the field holds bare keys), in order
_WRITES = (
    ("outbox_del", "DELETE FROM outbox WHERE id = ?", True),
    ("outbox_put", "INSERT OR REPLACE INTO outbox VALUES (?, ?, ?, ?)", False),
    ("outbox_acked", "UPDATE outbox SET acked = ? WHERE id = ?", False),
    ("dedup_del", "DELETE FROM dedup WHERE id = ?", True),
    ("dedup_put", "INSERT OR REPLACE INTO dedup VALUES (?, ?, ?, ?, ?)", False),
    ("results_del", "DELETE FROM results WHERE msg_id = ?", True),
    ("results_put", "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?)", False),
    ("letters_del", "DELETE FROM letters WHERE id = ?", True),
    ("letters_put", "INSERT OR REPLACE INTO letters VALUES (?, ?)", False),
    ("state_drop", "DELETE FROM state WHERE partition = ?", True),
    ("state_del", "DELETE FROM state WHERE type = ? AND key = ?", False),
    ("state_put", "INSERT OR REPLACE INTO state VALUES (?, ?, ?, ?)", False),
    ("epochs_del", "DELETE FROM epochs WHERE partition = ?", True),
    ("epochs_put", "INSERT OR REPLACE INTO epochs VALUES (?, ?)", False),
)


class SqliteStore:
    """The store in SQLite (WAL mode) in a data dir: ``SqliteStore.open(DIR, service=..., name=...)``.

    :meth:`write` commits with ``synchronous=NORMAL``: the commit is in the write-ahead log, in
    the OS (a crash of the process loses none of it), not yet on disk. :meth:`sync` puts every
    commit written so far on disk (an fsync of the log: what ``synchronous=FULL`` does at each
    commit); the runtime calls it after each commit under fsync ``"batch"``, every ``interval``
    seconds under ``"interval"``, never under ``"off"``. SQLite copies the log into the database
    (a checkpoint, which syncs both) as it passes 1000 pages.
    """

    def __init__(self, path: Path, lock: IO[str], conn: sqlite3.Connection, fsync: str, interval: float) -> None:
        self.path = str(path)
        self._dir = path
        self._lock = lock
        self._conn = conn
        self.fsync = fsync
        self.interval = interval
        self.identity = StoredIdentity(None, "?", 0)

    @classmethod
    def open(
        cls, data_dir: str | os.PathLike[str], *, service: str | None, name: str | None, fsync: str = "batch",
        interval: float = 0.1,
    ) -> SqliteStore:
        """Lock the data dir (creating it), check what is there, claim the identity; DataDirError
        when the dir cannot be used, with nothing in it changed."""
        _check_policy(fsync, interval)
        path = Path(os.path.abspath(os.fspath(data_dir)))
        if path.exists() and not path.is_dir():
            raise DataDirError(f"data dir {path} is a file, not a directory: give a directory (nothing was changed)")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataDirError(f"cannot create data dir {path}: {exc.strerror}") from None
        lock = _lock(path)
        conn: sqlite3.Connection | None = None
        try:
            db = path / STORE_FILE
            meta = _read_meta(path, db) if db.exists() else None
            if meta is None:
                others = sorted(
                    p.name for p in path.iterdir() if p.name != LOCK_FILE and not p.name.startswith(STORE_FILE)
                )
                if others:
                    raise DataDirError(
                        f"data dir {path} is not empty and holds no choreo store (it has {', '.join(others[:3])}"
                        f"{', ...' if len(others) > 3 else ''}): give a new or empty directory (nothing was changed)"
                    )
            new = meta is None
            conn = sqlite3.connect(str(db), isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # commits reach the OS; sync() puts them on disk
            conn.execute("PRAGMA journal_size_limit=67108864")  # the log shrinks back to 64 MiB after one
            store = cls(path, lock, conn, fsync, interval)
            store.identity = identity = _claimed(str(path), meta, service, name)
            values = {"app": "choreo", "format": FORMAT, "service": service or "", "name": identity.name,
                      "lives": identity.lives}
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", values.items())
            conn.execute("COMMIT")
            store.sync()  # the identity (a new life) on disk before the node says anything
            if new:
                _sync_dir(path)  # the new files' names too
            return store
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            _unlock(lock)
            raise DataDirError(f"data dir {path}: cannot open its store: {exc}") from None
        except BaseException:
            if conn is not None:
                conn.close()
            _unlock(lock)
            raise

    # -- reading -------------------------------------------------------------------------------

    def load(self) -> Snapshot:
        c = self._conn
        system = c.execute("SELECT spec FROM system WHERE id = 1").fetchone()
        return Snapshot(
            self.identity,
            c.execute("SELECT id, service, body, acked FROM outbox ORDER BY id").fetchall(),
            c.execute("SELECT id, type, t, expires, entries FROM dedup ORDER BY id").fetchall(),
            c.execute("SELECT msg_id, t, expires, partition, reply FROM results").fetchall(),
            c.execute("SELECT id, letter FROM letters ORDER BY id").fetchall(),
            system[0] if system is not None else None,
            c.execute("SELECT type, key, partition, body FROM state").fetchall(),
            c.execute("SELECT partition, epoch FROM epochs").fetchall(),
        )

    def outbox_rows(self) -> list[int]:
        return [row for (row,) in self._conn.execute("SELECT id FROM outbox")]

    def size(self) -> int:
        """Bytes on disk: the database and its write-ahead log."""
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.path.getsize(self._dir / (STORE_FILE + suffix))
            except OSError:
                pass
        return total

    def used(self) -> int:
        """Bytes of the database in use (pages not free; the file keeps freed pages for reuse)."""
        c = self._conn
        pages = c.execute("PRAGMA page_count").fetchone()[0] - c.execute("PRAGMA freelist_count").fetchone()[0]
        return int(pages * c.execute("PRAGMA page_size").fetchone()[0])

    # -- writing -------------------------------------------------------------------------------

    def write(self, batch: Batch) -> None:
        """Apply ``batch`` as one transaction (StoreFull or StoreError, nothing applied, if it fails)."""
        c = self._conn
        try:
            c.execute("BEGIN IMMEDIATE")
            for field, sql, keys_only in _WRITES:  # deletes before puts: a row may go and come back
                rows = getattr(batch, field)
                if rows:
                    c.executemany(sql, [(key,) for key in rows] if keys_only else rows)
            if batch.system is not None:
                c.execute("INSERT OR REPLACE INTO system VALUES (1, ?)", (batch.system,))
            c.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            if c.in_transaction:
                try:
                    c.execute("ROLLBACK")
                except sqlite3.Error:  # pragma: no cover - SQLite rolled back by itself
                    pass
            raise self._failure(exc) from None

    def sync(self) -> None:
        """Put every commit so far on disk (fsync="interval" calls it every ``interval`` seconds)."""
        for suffix in ("-wal", ""):
            try:
                fd = os.open(self._dir / (STORE_FILE + suffix), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            except OSError as exc:
                raise self._failure(exc) from None
            finally:
                os.close(fd)

    def _failure(self, exc: BaseException) -> StoreError:
        full = getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL" or getattr(exc, "errno", None) == errno.ENOSPC
        if full:
            return StoreFull(self.path, str(exc))
        return StoreError(
            f"data dir {self.path}: a commit failed ({exc}); this node holds its acknowledgements and emits "
            "until a commit succeeds (nothing committed is lost)"
        )

    def close(self) -> None:
        """Close the database and unlock the data dir (anything not written is not written)."""
        try:
            self._conn.close()
        finally:
            _unlock(self._lock)


def _read_meta(path: Path, db: Path) -> dict[str, Any] | None:
    """The store's metadata, read without writing anything (DataDirError if it is not a usable
    store; None if it holds nothing at all: the store's schema and identity go in one transaction,
    so a node killed while it first opened its data dir leaves an empty database behind)."""
    kept = "(nothing was changed)"
    # without a log the database file is complete: read it as immutable, which creates no side files
    immutable = "" if os.path.exists(str(db) + "-wal") else "&immutable=1"
    try:
        conn = sqlite3.connect(f"file:{quote(str(db))}?mode=ro{immutable}", uri=True)
    except sqlite3.Error as exc:
        raise DataDirError(f"data dir {path}: cannot read {STORE_FILE}: {exc} {kept}") from None
    try:
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                    return None  # an empty database: a first open killed before its one transaction
                raise DataDirError(
                    f"data dir {path}: {STORE_FILE} is an SQLite database but not a choreo store: give each node its "
                    f"own new data dir {kept}"
                ) from None
            raise
        if meta.get("app") != "choreo":
            raise DataDirError(f"data dir {path}: {STORE_FILE} is not a choreo store (no choreo metadata) {kept}")
        try:
            version = int(meta.get("format", ""))
        except ValueError:
            raise DataDirError(f"data dir {path}: {STORE_FILE} has no valid format version {kept}") from None
        if version > FORMAT:
            raise DataDirError(
                f"data dir {path} was written by a newer choreo (store format {version}; this choreo reads format "
                f"{FORMAT}): upgrade choreo on this host {kept}"
            )
        if version < 1:
            raise DataDirError(f"data dir {path}: {STORE_FILE} has an invalid format version {version} {kept}")
        check = conn.execute("PRAGMA quick_check").fetchone()
        if check is None or check[0] != "ok":
            raise DataDirError(
                f"data dir {path}: {STORE_FILE} is damaged ({check[0] if check else 'no answer'}): restore it from a "
                f"backup, or move it away to start this node afresh {kept}"
            )
        return meta
    except sqlite3.DatabaseError as exc:
        raise DataDirError(
            f"data dir {path}: {STORE_FILE} is not a choreo store, or is damaged ({exc}): give each node its own new "
            f"data dir, or restore it from a backup {kept}"
        ) from None
    finally:
        conn.close()


def _lock(path: Path) -> IO[str]:
    """Hold the data dir's lock file (released when the process dies, however it dies)."""
    try:
        f = open(path / LOCK_FILE, "a+")
    except OSError as exc:
        raise DataDirError(f"data dir {path}: cannot write its lock file: {exc.strerror}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise DataDirError(
            f"data dir {path} is in use by another node ({holder or 'another process'}): one node per data dir"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlock(lock: IO[str]) -> None:
    try:
        fcntl.flock(lock, fcntl.LOCK_UN)
    finally:
        lock.close()

