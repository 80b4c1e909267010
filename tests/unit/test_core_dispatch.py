"""KeyedDispatch: at most one message per key in progress, FIFO per key, against both cores."""

from __future__ import annotations

import random

import pytest

from choreo import _core, _pycore


@pytest.fixture(params=[_core, _pycore], ids=["compiled", "pure"])
def core(request):
    return request.param


def test_doc_example(core) -> None:
    d = core.KeyedDispatch()
    assert (d.admit(b"k", "m1"), d.admit(b"k", "m2"), d.admit(b"j", "m3")) == (True, False, True)
    assert d.done(b"k") == "m2"
    assert d.done(b"k") is None
    assert not d.busy(b"k") and d.busy(b"j")


def test_fifo_per_key_and_parallel_keys(core) -> None:
    d = core.KeyedDispatch()
    assert d.admit(b"a", "a1") and d.admit(b"b", "b1")
    for i in range(2, 6):
        assert not d.admit(b"a", f"a{i}")
    assert not d.admit(b"b", "b2")
    assert (d.queued, d.busy_keys) == (5, 2)
    assert [d.done(b"a") for _ in range(4)] == ["a2", "a3", "a4", "a5"]
    assert d.done(b"b") == "b2"
    assert d.done(b"a") is None and d.done(b"b") is None
    assert (d.queued, d.busy_keys) == (0, 0)


def test_done_of_an_idle_key(core) -> None:
    d = core.KeyedDispatch()
    with pytest.raises(KeyError, match="has nothing in progress"):
        d.done(b"nobody")
    d.admit(b"k", 1)
    d.done(b"k")
    with pytest.raises(KeyError):
        d.done(b"k")


def test_none_item_is_refused(core) -> None:
    d = core.KeyedDispatch()
    with pytest.raises(ValueError, match="item must not be None"):
        d.admit(b"k", None)
    assert not d.busy(b"k") and d.busy_keys == 0


def test_drain_keys(core) -> None:
    d = core.KeyedDispatch()
    for key in (b"a", b"b", b"c"):
        for i in range(3):
            d.admit(key, (key, i))
    out = d.drain_keys([b"a", b"c", b"zzz"])
    assert out == [(b"a", 1), (b"a", 2), (b"c", 1), (b"c", 2)]
    assert d.queued == 2
    assert d.busy(b"a")  # its current item still runs; the key is free once it finishes
    assert d.done(b"a") is None
    assert d.done(b"b") == (b"b", 1)


def test_random_interleaving_keeps_per_key_order(core) -> None:
    rng = random.Random(11)
    d = core.KeyedDispatch()
    running: dict[bytes, tuple[bytes, int]] = {}
    seen: dict[bytes, list[int]] = {}
    counter = dict.fromkeys([b"k%d" % i for i in range(8)], 0)
    for _ in range(5000):
        if running and rng.random() < 0.5:
            key = rng.choice(sorted(running))
            _, n = running.pop(key)
            seen.setdefault(key, []).append(n)
            nxt = d.done(key)
            if nxt is not None:
                running[key] = nxt
        else:
            key = rng.choice(sorted(counter))
            item = (key, counter[key])
            counter[key] += 1
            if d.admit(key, item):
                assert key not in running  # at most one per key in progress
                running[key] = item
            else:
                assert key in running
    for key, ns in seen.items():
        assert ns == list(range(len(ns))), key  # FIFO per key
    assert d.busy_keys == len(running)
