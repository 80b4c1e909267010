"""The uploader: stores each document in the blob store, then emits a small event with its reference."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from choreo import NodeConfig, Service, message_options
from choreo.messages import encode

from .blobstore import BlobStore
from .indexer import summarize
from .messages import DocumentInfo, DocumentUploaded, GetDocument

uploader = Service("uploader", emits=[DocumentUploaded], sends=[GetDocument], doc="the document upload service")

WORDS = ("event broker queue stream choreography partition offset consumer producer ack retry backoff "
         "idempotent order key window credit lag saga outbox replay snapshot projection").split()


def document(n: int, seed: int) -> bytes:
    """A seeded text of 1.2 to 2.4 MB: more than choreo carries in one message (1 MiB by default)."""
    rng = random.Random(f"{seed}/{n}")
    target = rng.randint(1_200_000, 2_400_000)
    lines, size = [], 0
    while size < target:
        line = " ".join(rng.choices(WORDS, k=12))
        lines.append(line)
        size += len(line) + 1
    return ("\n".join(lines) + "\n").encode()


@dataclass
class Outcome:
    sizes: dict[str, int] = field(default_factory=dict)
    event_bytes: int = 0  # the largest event body sent
    infos: dict[str, DocumentInfo | None] = field(default_factory=dict)
    wrong: list[str] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        return 1 if self.wrong else 0


async def drive(client, system, documents: int = 8, seed: int = 4) -> Outcome:
    store = BlobStore(system.data_dir / "blobs")
    out = Outcome()
    expected = {}
    for n in range(documents):
        data = document(n, seed)
        event = DocumentUploaded(f"doc{n:02d}", store.put(data), len(data))
        out.sizes[event.doc_id] = len(data)
        out.event_bytes = max(out.event_bytes, len(encode(event)))
        expected[event.doc_id] = summarize(event.doc_id, data, "")
        await client.emit(event)
    await client.flush(timeout=60)
    for doc_id, want in expected.items():
        got = out.infos[doc_id] = await client.ask(GetDocument(doc_id))
        if got is None or (got.size, got.words, got.lines, got.top_word) != (want.size, want.words, want.lines, want.top_word):
            out.wrong.append(doc_id)
    limit = NodeConfig().max_message_bytes
    by = {}
    for info in out.infos.values():
        if info is not None:
            by[info.indexed_by] = by.get(info.indexed_by, 0) + 1
    print(f"{documents} documents of {min(out.sizes.values()) / 1e6:.1f} to {max(out.sizes.values()) / 1e6:.1f} MB, "
          f"above the largest message choreo carries ({limit / 2**20:.0f} MiB)")
    print(f"each stored in the blob store ({store.directory}); each {message_options(DocumentUploaded).name} event "
          f"carried only its reference: {out.event_bytes} bytes at most")
    print("indexed by " + ", ".join(f"{k} ({v})" for k, v in sorted(by.items())))
    print("every index matches its document" if not out.wrong else f"WRONG: {out.wrong}")
    return out
