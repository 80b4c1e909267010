"""DedupWindow edge cases: TTL boundary, count eviction, a million ids, export/import, against both cores."""

from __future__ import annotations

import os
import random

import pytest

from choreo import _core, _pycore

Z = bytes(16)


@pytest.fixture(params=[_core, _pycore], ids=["compiled", "pure"])
def core(request):
    return request.param


def ident(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_doc_example(core) -> None:
    d = core.DedupWindow(ttl=10.0, max_entries=1000)
    assert (d.insert(b"a" * 16, now=0.0), d.insert(b"a" * 16, now=5.0), d.insert(b"a" * 16, now=10.0)) == (
        True, False, True)


@pytest.mark.parametrize("kwargs,message", [(dict(ttl=0.0, max_entries=1), "ttl must be > 0"),
                                            (dict(ttl=float("nan"), max_entries=1), "ttl must be > 0"),
                                            (dict(ttl=1.0, max_entries=0), "max_entries must be >= 1")])
def test_constructor_errors(core, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        core.DedupWindow(**kwargs)


@pytest.mark.parametrize("t,ttl", [(0.0, 10.0), (0.7, 0.1), (0.1, 0.2), (1e9 + 0.3, 300.0), (12345.678, 1e-3)])
def test_expiry_exactly_at_the_boundary(core, t: float, ttl: float) -> None:
    # a duplicate while now < t + ttl, new again at now == t + ttl (as computed in floating point)
    d = core.DedupWindow(ttl=ttl, max_entries=10)
    i = b"i" * 16
    assert d.insert(i, t)
    end = t + ttl
    just_before = end - abs(end) * 2**-52 if end else -5e-324
    while just_before >= end:
        just_before -= abs(end) * 2**-52
    assert just_before < end
    assert d.contains(i, just_before)
    assert not d.insert(i, just_before)
    assert not d.contains(i, end)
    assert d.insert(i, end)  # new again, now remembered from `end`
    assert not d.insert(i, end)
    s = d.stats()
    assert (s.inserted, s.duplicates, s.expired) == (2, 2, 1)


def test_expire_counts_and_order(core) -> None:
    d = core.DedupWindow(ttl=10.0, max_entries=100)
    for i in range(10):
        d.insert(ident(i), float(i))
    assert d.expire(9.999) == 0
    assert d.expire(12.0) == 3  # inserted at 0, 1, 2
    assert len(d) == 7 and not d.contains(ident(2), 12.0) and d.contains(ident(3), 12.0)
    assert d.expire(100.0) == 7 and len(d) == 0
    assert d.stats().expired == 10


def test_count_eviction_oldest_first(core) -> None:
    d = core.DedupWindow(ttl=1e9, max_entries=3)
    for i in range(3):
        assert d.insert(ident(i), 0.0)
    assert d.insert(ident(3), 1.0)  # evicts 0, the oldest
    assert [d.contains(ident(i), 1.0) for i in range(4)] == [False, True, True, True]
    assert d.insert(ident(0), 2.0)  # forgotten, so new again; evicts 1
    assert [d.contains(ident(i), 2.0) for i in range(4)] == [True, False, True, True]
    assert not d.insert(ident(2), 3.0)  # a duplicate does not refresh its age
    assert d.insert(ident(9), 3.0)  # evicts 2, not 3
    assert [d.contains(ident(i), 3.0) for i in (0, 2, 3, 9)] == [True, False, True, True]
    s = d.stats()
    assert (s.entries, s.evicted, s.inserted, s.duplicates) == (3, 3, 6, 1)


def test_eviction_skips_removed_entries(core) -> None:
    d = core.DedupWindow(ttl=1e9, max_entries=3)
    for i in range(3):
        d.insert(ident(i), 0.0)
    assert d.remove(ident(0)) and not d.remove(ident(0))
    assert d.insert(ident(3), 0.0)  # room after the removal: nothing evicted
    assert d.stats().evicted == 0
    assert d.insert(ident(4), 0.0)  # evicts 1 (0 is gone already)
    assert [d.contains(ident(i), 0.0) for i in range(5)] == [False, False, True, True, True]


def test_remove_allows_again(core) -> None:
    d = core.DedupWindow(ttl=10.0, max_entries=10)
    d.insert(b"x" * 16, 0.0)
    assert d.remove(b"x" * 16)
    assert d.insert(b"x" * 16, 1.0)
    assert d.contains(b"x" * 16, 10.5)  # remembered from 1.0 now


def test_idempotency_keys_of_any_length(core) -> None:
    d = core.DedupWindow(ttl=10.0, max_entries=10)
    assert d.insert(b"cart-17", 0.0)
    assert not d.insert(bytearray(b"cart-17"), 1.0)
    assert d.insert(b"cart-18", 1.0)
    assert d.contains(core.hash128(b"cart-17"), 1.0)  # longer or shorter keys are kept as their hash128
    assert d.insert(b"", 1.0) and not d.insert(b"", 2.0)
    with pytest.raises(TypeError):
        d.insert("cart-17", 0.0)
    with pytest.raises(TypeError):
        d.insert(16, 0.0)  # not sixteen zero bytes


def test_time_going_backwards(core) -> None:
    d = core.DedupWindow(ttl=10.0, max_entries=10)
    d.insert(ident(1), 100.0)
    d.insert(ident(2), 50.0)  # older than the entry in front of it
    assert d.contains(ident(2), 59.9) and not d.contains(ident(2), 60.0)
    # expiry goes oldest inserted first and stops at the first live one
    assert d.expire(105.0) == 0
    assert not d.contains(ident(2), 105.0)  # expired, though not yet forgotten
    assert len(d) == 2
    assert d.insert(ident(2), 105.0)  # an expired leftover counts as new
    assert d.expire(111.0) == 1 and len(d) == 1


def test_partition_range(core) -> None:
    d = core.DedupWindow(ttl=10.0, max_entries=10)
    for bad in (-1, 65536, 70000):
        with pytest.raises(ValueError, match="partition must be in 0..65535"):
            d.insert(ident(1), 0.0, bad)
        with pytest.raises(ValueError, match="partition must be in 0..65535"):
            d.export_partition(bad)
        with pytest.raises(ValueError, match="partition must be in 0..65535"):
            d.drop_partition(bad)
    assert len(d) == 0


def test_export_import_a_partition(core) -> None:
    a = core.DedupWindow(ttl=100.0, max_entries=1000)
    for i in range(30):
        a.insert(ident(i), float(i), partition=i % 3)
    blob = a.export_partition(1)
    assert len(blob) == 4 + 10 * 24 and int.from_bytes(blob[:4], "little") == 10
    assert a.export_partition(7) == b"\x00\x00\x00\x00"
    b = core.DedupWindow(ttl=100.0, max_entries=1000)
    b.insert(ident(4), 50.0, partition=9)  # already present: kept as it is
    assert b.import_entries(blob, 5) == 9
    assert b.import_entries(blob, 5) == 0
    assert all(b.contains(ident(i), 100.0) for i in range(1, 30, 3))
    # times travel with the entries: id 1 was inserted at 1.0, so it expires at 101.0
    assert b.contains(ident(1), 100.999) and not b.contains(ident(1), 101.0)
    assert not b.contains(ident(0), 0.0)
    # imported under the new partition, same ids and times, oldest first
    moved = b.export_partition(5)
    assert int.from_bytes(moved[:4], "little") == 9
    assert moved[4:] == b"".join(blob[4 + 24 * k : 28 + 24 * k] for k in range(10) if k != 1)  # id 4 was there
    assert b.drop_partition(5) == 9 and len(b) == 1
    assert a.drop_partition(1) == 10 and len(a) == 20 and not a.contains(ident(1), 1.0)


def test_export_format_is_portable(core) -> None:
    d = core.DedupWindow(ttl=100.0, max_entries=10)
    d.insert(ident(7), 1.5, partition=2)
    # u32 count | 16-byte id | little-endian IEEE 754 double time
    assert d.export_partition(2) == b"\x01\x00\x00\x00" + ident(7) + bytes.fromhex("000000000000f83f")
    # both cores read each other's exports
    other = (_pycore if core is _core else _core).DedupWindow(ttl=100.0, max_entries=10)
    assert other.import_entries(d.export_partition(2), 3) == 1
    assert other.contains(ident(7), 101.4) and not other.contains(ident(7), 101.5)


@pytest.mark.parametrize("blob", [b"", b"\x01\x00\x00", b"\x01\x00\x00\x00" + bytes(23), b"\x00\x00\x00\x00\x00"])
def test_import_malformed(core, blob: bytes) -> None:
    d = core.DedupWindow(ttl=10.0, max_entries=10)
    with pytest.raises(core.MalformedFrame) as info:
        d.import_entries(blob, 0)
    assert info.value.reason == "truncated"
    assert len(d) == 0


def test_import_evicts_at_capacity(core) -> None:
    src = core.DedupWindow(ttl=100.0, max_entries=100)
    for i in range(10):
        src.insert(ident(i), 1.0, partition=4)
    d = core.DedupWindow(ttl=100.0, max_entries=5)
    for i in range(100, 105):
        d.insert(ident(i), 2.0)
    assert d.import_entries(src.export_partition(4), 4) == 10
    assert len(d) == 5 and d.stats().evicted == 10
    assert [d.contains(ident(i), 3.0) for i in range(5, 10)] == [True] * 5


def test_insert_envelopes_uses_msg_id_and_partition(core) -> None:
    body = b"".join(core.pack_envelope(s, 1, 0, b"T", b"", s % 4, ident(s % 5), Z, Z, b"") for s in range(1, 11))
    envs = core.parse_envelopes(body)
    d = core.DedupWindow(ttl=10.0, max_entries=100)
    assert d.insert_envelopes(envs, 0.0) == [True] * 5 + [False] * 5
    assert d.insert_envelopes(iter(envs[:2]), 1.0) == [False, False]
    assert int.from_bytes(d.export_partition(1)[:4], "little") == 2  # seqs 1 and 5 -> ids 1 and 0
    assert d.insert_many([ident(0), ident(50), ident(50)], 2.0) == [False, True, False]


def test_insert_envelopes_of_the_other_core(core) -> None:
    other = _pycore if core is _core else _core
    envs = other.parse_envelopes(other.pack_envelope(1, 1, 0, b"T", b"", 3, ident(1), Z, Z, b""))
    d = core.DedupWindow(ttl=10.0, max_entries=100)
    assert d.insert_envelopes(envs, 0.0) == [True]
    assert d.insert_envelopes(envs, 0.0) == [False]
    with pytest.raises((TypeError, AttributeError)):
        d.insert_envelopes([object()], 0.0)


def test_many_random_operations_agree_with_a_dict(core) -> None:
    # a plain model of the contract, independent of both cores
    rng = random.Random(7)
    ttl, cap = 5.0, 50
    d = core.DedupWindow(ttl=ttl, max_entries=cap)
    model: dict[bytes, float] = {}
    now = 0.0
    for _ in range(5000):
        now += rng.choice([0.0, 0.01, 0.5])
        key = ident(rng.randrange(120))
        op = rng.random()
        if op < 0.8:
            # expire oldest-first while expired (insertion order = time order here)
            while model and not now < next(iter(model.values())) + ttl:
                del model[next(iter(model))]
            live = key in model and now < model[key] + ttl
            assert d.insert(key, now) == (not live)
            if not live:
                model.pop(key, None)
                if len(model) >= cap:
                    del model[next(iter(model))]
                model[key] = now
        elif op < 0.9:
            assert d.remove(key) == (key in model)
            model.pop(key, None)
        else:
            assert d.contains(key, now) == (key in model and now < model[key] + ttl)
        assert len(d) == len(model)


def test_a_million_ids(core) -> None:
    n = 1_000_000
    d = core.DedupWindow(ttl=1000.0, max_entries=n)
    ids = [os.urandom(16) for _ in range(n)]
    assert all(d.insert_many(ids, 1.0))
    assert len(d) == n and d.stats().evicted == 0
    sample = random.Random(3).sample(range(n), 2000)
    assert not any(d.insert(ids[i], 2.0) for i in sample)  # all still remembered
    assert all(d.contains(ids[i], 2.0) for i in sample)
    assert d.insert(b"\xff" * 16, 3.0) and d.stats().evicted == 1  # the oldest made room
    assert not d.contains(ids[0], 3.0) and d.contains(ids[1], 3.0)
    if core is _core:
        per_entry = d.memory_bytes / len(d)
        assert per_entry <= 100, f"{per_entry:.1f} bytes per entry, the budget is 100"
    assert d.expire(1001.0) == n - 1 and len(d) == 1  # a mass expiry, oldest first


def test_compiled_table_through_eviction_expiry_bursts_and_renumbering() -> None:
    """The compiled window forgets the oldest entries lazily (their table slots go stale and are
    swept later); whatever the mix of evictions, mass expiries, removals and renumbering, it must
    answer like the twin and keep its table consistent and under 3/4 load."""
    rng = random.Random(11)
    c, p = _core.DedupWindow(ttl=50.0, max_entries=3000), _pycore.DedupWindow(ttl=50.0, max_entries=3000)
    c._set_seq_limit(20_000)  # renumber about every 17k inserts instead of every 2**32
    now = 0.0
    for round_ in range(40):
        ids = [ident(rng.randrange(12_000)) for _ in range(rng.choice([100, 2000, 5000]))]
        assert c.insert_many(ids, now) == p.insert_many(ids, now)
        for i in rng.sample(range(12_000), 200):
            assert c.remove(ident(i)) == p.remove(ident(i))
        c._audit()
        # mostly small steps, sometimes a jump that expires everything at once
        now += rng.choice([0.5, 1.0, 60.0]) if round_ % 7 else 200.0
        assert c.expire(now) == p.expire(now)
        c._audit()
        assert c.stats() == p.stats() and len(c) == len(p)
    assert c.stats().evicted > 0 and c.stats().expired > 3000
    with pytest.raises(ValueError):
        c._set_seq_limit(10)  # must leave room for a whole ring after renumbering


def test_memory_bytes_reported(core) -> None:
    d = core.DedupWindow(ttl=10.0, max_entries=10_000)
    empty = d.memory_bytes
    for i in range(5000):
        d.insert(ident(i), 0.0)
    assert d.memory_bytes > empty > 0
