"""A local blob store: files named by the SHA-256 of their content, under ``$CHOREO_DATA_DIR/blobs``.

Content addressing makes the reference a checksum too (a reader knows if it got the right bytes)
and makes ``put`` idempotent (storing the same document twice stores it once). Writes go to a
temporary file first, then are renamed: a reader never sees half a blob.

    >>> import tempfile
    >>> store = BlobStore(tempfile.mkdtemp())
    >>> ref = store.put(b"hello")
    >>> ref[:7], store.get(ref)
    ('sha256:', b'hello')
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


class BlobStore:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    @classmethod
    def default(cls) -> BlobStore:
        """The run's store: ``$CHOREO_DATA_DIR/blobs`` (``choreo up`` sets the variable for every process)."""
        return cls(Path(os.environ.get("CHOREO_DATA_DIR", "choreo-data")) / "blobs")

    def _path(self, digest: str) -> Path:
        return self.directory / digest[:2] / digest[2:]

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self._path(digest)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return f"sha256:{digest}"

    def get(self, ref: str) -> bytes:
        scheme, _, digest = ref.partition(":")
        if scheme != "sha256" or len(digest) != 64:
            raise ValueError(f"not a blob reference: {ref!r}")
        data = self._path(digest).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"blob {ref} is corrupt")
        return data
