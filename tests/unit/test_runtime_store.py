"""The node-local store: what it keeps, whose it is, and the data dirs it refuses without touching them.

Each refusal is checked for its one-line message and for leaving every file of the data dir
exactly as it was. A full disk is SQLite's own SQLITE_FULL (the database capped with
``max_page_count``): the commit fails whole, the store stays readable and consistent, and the
next commit after space frees succeeds.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest

from choreo.errors import DataDirError, StoreFull
from choreo.runtime.store import FORMAT, STORE_FILE, Batch, MemoryStore, SqliteStore


def fingerprint(directory: Path) -> dict[str, str]:
    """Every file of a directory and a hash of its bytes (the LOCK file's holder line aside)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != "LOCK"
    }


def made(directory: Path, service: str | None = "orders", name: str | None = None) -> str:
    """A store written once and closed; returns its node's name."""
    store = SqliteStore.open(directory, service=service, name=name)
    store.write(Batch(outbox_put=[(1, "payments", b"body", 0)], letters_put=[(1, b"letter")]))
    identity = store.identity.name
    store.close()
    return identity


def refused(directory: Path, **kwargs) -> str:  # type: ignore[no-untyped-def]
    before = fingerprint(directory)
    with pytest.raises(DataDirError) as info:
        SqliteStore.open(directory, **{"service": "orders", "name": None, **kwargs})
    assert fingerprint(directory) == before, "a refused data dir was changed"
    message = str(info.value)
    assert "\n" not in message and str(directory) in message, message
    return message


def test_a_restarted_store_keeps_the_name_counts_lives_and_returns_what_was_committed(tmp_path: Path) -> None:
    name = made(tmp_path / "d")
    store = SqliteStore.open(tmp_path / "d", service="orders", name=None)
    try:
        assert store.identity.name == name and name.startswith("orders#")
        assert store.identity.lives == 2
        snap = store.load()
        assert snap.outbox == [(1, "payments", b"body", 0)] and snap.letters == [(1, b"letter")]
        store.write(Batch(outbox_del=[1], outbox_put=[(2, "payments", b"next", 0)], outbox_acked=[(5, 2)]))
        assert store.load().outbox == [(2, "payments", b"next", 5)]
    finally:
        store.close()
    named = SqliteStore.open(tmp_path / "e", service="orders", name="orders-east-1")
    named.close()
    assert SqliteStore.open(tmp_path / "e", service="orders", name=None).identity.name == "orders-east-1"


def test_a_data_dir_in_use_by_another_node_is_refused_until_it_is_released(tmp_path: Path) -> None:
    made(tmp_path)
    holder = SqliteStore.open(tmp_path, service="orders", name=None)
    try:
        message = refused(tmp_path)
        assert "is in use by another node" in message and f"pid {os.getpid()}" in message, message
    finally:
        holder.close()
    SqliteStore.open(tmp_path, service="orders", name=None).close()


def test_another_services_or_another_nodes_data_dir_is_refused(tmp_path: Path) -> None:
    name = made(tmp_path)
    message = refused(tmp_path, service="payments")
    assert f"belongs to {name}, service orders, not to service payments" in message, message
    message = refused(tmp_path, service=None)
    assert "not to a client" in message, message
    message = refused(tmp_path, name="orders#other")
    assert f"belongs to node {name}, not orders#other" in message, message


def test_a_file_that_is_not_a_database_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    (tmp_path / STORE_FILE).write_bytes(b"these are not the bytes of a database\n" * 100)
    message = refused(tmp_path)
    assert "is not a choreo store, or is damaged" in message and "file is not a database" in message, message


def test_an_sqlite_database_of_something_else_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / STORE_FILE)
    conn.execute("CREATE TABLE accounts(id INTEGER PRIMARY KEY, owner TEXT)")
    conn.execute("INSERT INTO accounts VALUES (1, 'someone')")
    conn.commit()
    conn.close()
    message = refused(tmp_path)
    assert "is an SQLite database but not a choreo store" in message, message


def test_a_store_whose_first_open_was_killed_before_it_committed_opens_as_new(tmp_path: Path) -> None:
    """A node killed while it first opened its data dir leaves an SQLite file with nothing in it
    (the schema and the identity are one transaction): the next start makes the store there
    (tests/integration/test_durable.py's seeded SIGKILLs met it on a slow machine)."""
    conn = sqlite3.connect(tmp_path / STORE_FILE)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    store = SqliteStore.open(tmp_path, service="orders", name=None)
    try:
        assert store.identity.lives == 1 and store.load().outbox == []
    finally:
        store.close()


def test_a_store_of_a_newer_format_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    made(tmp_path)
    conn = sqlite3.connect(tmp_path / STORE_FILE)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'format'", (FORMAT + 1,))
    conn.commit()
    conn.close()
    message = refused(tmp_path)
    assert f"written by a newer choreo (store format {FORMAT + 1}; this choreo reads format {FORMAT})" in message
    assert "upgrade choreo" in message


def test_a_damaged_store_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path, service="orders", name=None)
    store.write(Batch(outbox_put=[(row, "payments", os.urandom(3000), 0) for row in range(1, 200)]))
    store.close()
    raw = bytearray((tmp_path / STORE_FILE).read_bytes())
    page = 4096
    for offset in range(8 * page, len(raw) - page, 3 * page):  # scribble over some of its b-tree pages
        raw[offset : offset + 64] = b"\xff" * 64
    (tmp_path / STORE_FILE).write_bytes(bytes(raw))
    message = refused(tmp_path)
    assert "is damaged" in message or "malformed" in message, message


def test_a_directory_with_other_files_and_no_store_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    message = refused(tmp_path)
    assert "is not empty and holds no choreo store (it has notes.txt)" in message, message


def test_a_data_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(DataDirError, match="is a file, not a directory"):
        SqliteStore.open(path, service="orders", name=None)


def test_a_full_disk_fails_the_commit_whole_and_the_store_stays_consistent(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path, service="orders", name=None)
    try:
        store.write(Batch(outbox_put=[(1, "payments", b"first", 0)]))
        pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
        store._conn.execute(f"PRAGMA max_page_count = {pages + 2}")  # SQLite's own "database or disk is full"
        big = Batch(outbox_put=[(row, "payments", os.urandom(4000), 0) for row in range(2, 40)], outbox_del=[1])
        with pytest.raises(StoreFull) as info:
            store.write(big)
        message = str(info.value)
        assert "the disk is full" in message and "free space there" in message and "\n" not in message
        assert store.load().outbox == [(1, "payments", b"first", 0)], "a failed commit was applied in part"
        assert store._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        store._conn.execute("PRAGMA max_page_count = 1073741823")  # space freed
        store.write(big)
        assert [row for row, *_ in store.load().outbox] == list(range(2, 40))
    finally:
        store.close()
    reopened = SqliteStore.open(tmp_path, service="orders", name=None)
    try:
        assert len(reopened.load().outbox) == 38
    finally:
        reopened.close()


def test_the_store_in_memory_refuses_like_a_data_dir_and_fills_like_a_disk() -> None:
    store = MemoryStore(capacity=100).open(service="orders", name=None)
    with pytest.raises(DataDirError, match="in use by another node"):
        store.open(service="orders", name=None)
    with pytest.raises(StoreFull):
        store.write(Batch(outbox_put=[(1, "payments", b"x" * 200, 0)]))
    assert store.load().outbox == []
    store.close()
    with pytest.raises(DataDirError, match="not to service payments"):
        store.open(service="payments", name=None)


def test_partition_epochs_are_kept_replaced_and_dropped_and_a_store_without_them_has_none(tmp_path: Path) -> None:
    """The epoch of each partition's copy (see choreo.runtime.ownership) survives a restart; a
    store written before epochs existed opens with none (its copies count as the oldest)."""
    store = SqliteStore.open(tmp_path / "d", service="orders", name="orders-1")
    store.write(Batch(epochs_put=[(3, 1_700_000_000_000), (5, 7)]))
    store.write(Batch(epochs_del=[5], epochs_put=[(3, 1_700_000_000_001)]))
    store.close()
    store = SqliteStore.open(tmp_path / "d", service="orders", name=None)
    assert store.load().epochs == [(3, 1_700_000_000_001)]
    store.close()
    with sqlite3.connect(tmp_path / "d" / STORE_FILE) as conn:  # as an older choreo left it
        conn.execute("DROP TABLE epochs")
    conn.close()
    store = SqliteStore.open(tmp_path / "d", service="orders", name=None)
    assert store.load().epochs == []
    store.write(Batch(epochs_put=[(2, 9)]))
    assert store.load().epochs == [(2, 9)]
    store.close()
    memory = MemoryStore().open(service="orders", name=None)
    memory.write(Batch(epochs_put=[(1, 4), (2, 5)]))
    memory.sync()
    memory.write(Batch(epochs_del=[1]))
    assert memory.load().epochs == [(2, 5)]
    memory.lose_power()
    assert memory.open(service="orders", name=None).load().epochs == [(1, 4), (2, 5)]


def test_the_store_in_memory_loses_on_power_failure_only_what_was_not_synced() -> None:
    store = MemoryStore().open(service="orders", name=None)
    store.write(Batch(outbox_put=[(1, "payments", b"synced", 0)]))
    store.sync()
    store.write(Batch(outbox_put=[(2, "payments", b"written", 0)]))
    assert [r[0] for r in store.load().outbox] == [1, 2]  # a crash of the process keeps both
    store.lose_power()
    assert [r[0] for r in store.open(service="orders", name=None).load().outbox] == [1]


@pytest.mark.parametrize("fsync", ["sometimes", ""])
def test_an_unknown_fsync_policy_is_refused(tmp_path: Path, fsync: str) -> None:
    with pytest.raises(ValueError, match="fsync must be one of 'batch', 'interval', 'off'"):
        SqliteStore.open(tmp_path, service="orders", name=None, fsync=fsync)
    assert not (tmp_path / STORE_FILE).exists()
