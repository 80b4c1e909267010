"""ctx.state's core (StateView): reads, buffered writes and their commit, the same in both cores."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import pytest

from choreo import _core, _pycore
from choreo.messages import simple_fields

CORES = [pytest.param(_core, id="compiled"), pytest.param(_pycore, id="pure")]
Z = bytes(16)
QUERY = 3


class Tally(msgspec.Struct):
    n: Annotated[int, msgspec.Meta(ge=0)] = 0


class Note(msgspec.Struct):
    text: str


class Refused(Exception):
    pass


class Ctx:
    """What a StateView reads of a handler context."""

    def __init__(self) -> None:
        self.envelope: Any = None
        self.writes: dict[int, bytes | None] | None = None


def env(core: Any, key: bytes, partition: int = 1, kind: int = 1, flags: int = 0) -> Any:
    raw = core.pack_envelope(1, kind, flags, b"T", key, partition, b"m" * 16, Z, Z, b"\x90")
    (e,) = core.parse_envelopes(raw)
    return e


def view(
    core: Any, standby: list[Any] | None = None, limit: int = 64, simple: list[Any] | None = None,
    decoded: list[str] | None = None, ctx: Any = None,
) -> tuple[Any, Any, list[list[dict]]]:
    """A view over two types; ``decoded``, when given, notes the name of each type decoded."""
    ctx = Ctx() if ctx is None else ctx
    tables: list[list[dict[bytes, bytes]]] = [[{} for _ in range(4)] for _ in range(2)]
    decoders = [msgspec.msgpack.Decoder(Tally).decode, msgspec.msgpack.Decoder(Note).decode]
    if decoded is not None:
        decoders = [lambda b, d=d, name=name: decoded.append(name) or d(b)  # type: ignore[misc]
                    for d, name in zip(decoders, ("Tally", "Note"))]

    def fail(what: str, t: Any, detail: Any) -> None:
        raise Refused(what, t if not isinstance(t, type) else t.__name__, type(detail).__name__)

    v = core.StateView(ctx, tables, {Tally: 0, Note: 1}, decoders, msgspec.msgpack.encode, limit, fail, standby,
                       None, simple)
    return v, ctx, tables


@pytest.mark.parametrize("core", CORES)
def test_writes_wait_for_the_commit_and_reads_see_them_first(core: Any) -> None:
    v, ctx, tables = view(core)
    ctx.envelope = env(core, b"k")
    assert v.get(Tally) is None and v.get(Tally, Tally(7)) == Tally(7)
    v.put(Tally(3))
    assert v.get(Tally) == Tally(3), "a handler reads its own write"
    assert tables[0][1] == {}, "nothing applied before the commit"
    assert v.commit(ctx.envelope) is False
    assert ctx.writes is None and tables[0][1] == {b"k": msgspec.msgpack.encode(Tally(3))}
    v.delete(Tally)
    assert v.get(Tally) is None and b"k" in tables[0][1]
    v.commit(ctx.envelope)
    assert tables[0][1] == {}


@pytest.mark.parametrize("core", CORES)
def test_items_list_the_partition_by_prefix_with_the_handlers_own_writes(core: Any) -> None:
    v, ctx, tables = view(core)
    tables[1][1].update({b"eu/fr": msgspec.msgpack.encode(Note("a")), b"us/ny": msgspec.msgpack.encode(Note("b"))})
    ctx.envelope = env(core, b"eu/de")
    v.put(Note("c"))
    assert v.items(Note, "eu/") == [("eu/de", Note("c")), ("eu/fr", Note("a"))]
    assert [k for k, _ in v.items(Note)] == ["eu/de", "eu/fr", "us/ny"]


@pytest.mark.parametrize("core", CORES)
def test_every_misuse_is_refused_and_changes_nothing(core: Any) -> None:
    v, ctx, tables = view(core, limit=24)
    ctx.envelope = env(core, b"k")
    for undeclared in (None, dict):  # (None: also before any type was used)
        with pytest.raises(Refused, match="'undeclared'"):
            v.get(undeclared)
    with pytest.raises(Refused, match="'invalid', 0, 'ValidationError'"):
        v.put(Tally(-1))
    with pytest.raises(Refused, match="'too_large', 1, 'int'"):
        v.put(Note("x" * 20))
    with pytest.raises(Refused, match="'undeclared', 'dict'"):
        v.put({"n": 1})
    v.put(Tally(1))
    with pytest.raises(Refused, match="'too_large_total', 1, 'int'"):
        v.put(Note("x" * 14))  # alone it fits; with the Tally it does not
    assert ctx.writes == {0: msgspec.msgpack.encode(Tally(1))}, "the refused write is not kept"
    ctx.writes = None
    ctx.envelope = env(core, b"", flags=1)  # unkeyed
    with pytest.raises(Refused, match="no_key"):
        v.get(Tally)
    ctx.envelope = env(core, b"k", kind=QUERY)
    assert v.get(Tally) is None
    with pytest.raises(Refused, match="read_only"):
        v.put(Tally(1))
    with pytest.raises(Refused, match="read_only"):
        v.delete(Tally)
    assert all(not t for per_type in tables for t in per_type)


@pytest.mark.parametrize("core", CORES)
def test_a_value_whose_fields_have_their_plain_types_is_written_unchecked_and_no_other(core: Any) -> None:
    # Tally's field has a constraint (it is always checked); Note's is a plain str
    simple = [simple_fields(Tally), simple_fields(Note)]
    assert simple == [None, (("text", (str,)),)]
    decoded: list[str] = []
    v, ctx, tables = view(core, simple=simple, decoded=decoded)
    ctx.envelope = env(core, b"k")
    v.put(Note("hello"))
    assert decoded == [], "its check could only pass: skipped"
    with pytest.raises(Refused, match="'invalid', 1, 'ValidationError'"):
        v.put(Note(7))  # type: ignore[arg-type]  # (a Struct does not check its fields when built)
    with pytest.raises(Refused, match="'invalid', 0, 'ValidationError'"):
        v.put(Tally(-1))
    assert decoded == ["Note", "Tally"], "a field of another type, or a constrained one: decoded"
    v.put(Tally(2))
    v.commit(ctx.envelope)
    decoded.clear()
    assert (v.get(Note), v.get(Tally)) == (Note("hello"), Tally(2))


@pytest.mark.parametrize("core", CORES)
def test_a_partition_with_a_standby_leaves_its_writes_to_a_job(core: Any) -> None:
    standby: list[Any] = [None, 42, None, None]
    v, ctx, tables = view(core, standby=standby)
    ctx.envelope = env(core, b"k", partition=1)
    v.put(Tally(5))
    assert v.commit(ctx.envelope) is True and ctx.writes is not None and tables[0][1] == {}
    standby[1] = None  # the standby went: the write is applied here at once
    assert v.commit(ctx.envelope) is False and tables[0][1] == {b"k": msgspec.msgpack.encode(Tally(5))}


@pytest.mark.parametrize("core", CORES)
def test_any_envelope_shaped_object_works(core: Any) -> None:
    class Replayed:  # a replayed dead letter is not a core Envelope
        flags, kind, partition, key = 0, 1, 2, b"r"

    v, ctx, tables = view(core)
    ctx.envelope = Replayed()
    v.put(Tally(9))
    v.commit(ctx.envelope)
    assert v.get(Tally) == Tally(9) and b"r" in tables[0][2]


class SlotCtx:
    """A context that keeps its fields in slots, as the runtime's HandlerContext does (the
    compiled view then reads and writes them without an attribute lookup)."""

    __slots__ = ("envelope", "handler", "writes", "outputs", "state")

    def __init__(self) -> None:
        self.envelope: Any = None
        self.handler = None
        self.writes: dict[int, bytes | None] | None = None
        self.outputs: list[Any] = []
        self.state = None


@pytest.mark.parametrize("ctx_class", [SlotCtx, Ctx])
@pytest.mark.parametrize("core", CORES)
def test_each_envelope_of_a_frame_counts_under_its_own_key(core: Any, ctx_class: type) -> None:
    """The envelopes of one frame, one after the other through one context: each reads and
    writes its own key's value, whatever the key the one before it had."""
    v, ctx, tables = view(core, ctx=ctx_class())
    keys = [b"a", b"b", b"a", b"c", b"b", b"a"]
    frame = b"".join(core.pack_envelope(i + 1, 1, 0, b"T", k, 1, bytes([i]) * 16, Z, Z, b"\x90")
                     for i, k in enumerate(keys))
    for e in core.parse_envelopes(frame):
        ctx.envelope = e
        ctx.writes = None
        t = v.get(Tally)
        v.put(Tally(t.n + 1) if t is not None else Tally(1))
        assert v.commit(e) is False and ctx.writes is None
    counts = {b"a": 3, b"b": 2, b"c": 1}
    assert {k: msgspec.msgpack.decode(b, type=Tally).n for k, b in tables[0][1].items()} == counts
    for e in core.parse_envelopes(frame):  # reads alone (no commit between them)
        ctx.envelope = e
        assert v.get(Tally) == Tally(counts[e.key])


class WatchedCtx(SlotCtx):
    """A slot-keeping context whose class has its own ``__setattr__``: the core must go through it."""

    __slots__ = ("set_names",)

    def __init__(self) -> None:
        object.__setattr__(self, "set_names", [])
        super().__init__()

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "set_names":
            self.set_names.append(name)
        object.__setattr__(self, name, value)


@pytest.mark.parametrize("core", CORES)
def test_a_context_class_with_its_own_setattr_sees_every_write(core: Any) -> None:
    v, ctx, tables = view(core, ctx=WatchedCtx())
    ctx.envelope = env(core, b"k")
    del ctx.set_names[:]
    v.put(Tally(2))
    assert v.commit(ctx.envelope) is False
    assert ctx.set_names == ["writes", "writes"], "the write buffered, then cleared by the commit"
    assert tables[0][1] == {b"k": msgspec.msgpack.encode(Tally(2))}
