"""indexer: redeems the claim check (reads the blob by its reference) and indexes the document."""

from collections import Counter

from choreo import Service

from .blobstore import BlobStore
from .messages import DocumentInfo, DocumentUploaded, GetDocument

indexer = Service("indexer")

_index: dict[str, DocumentInfo] = {}


def summarize(doc_id: str, data: bytes, by: str) -> DocumentInfo:
    text = data.decode()
    words = text.split()
    return DocumentInfo(doc_id, len(data), len(words), text.count("\n"), Counter(words).most_common(1)[0][0], by)


@indexer.on(DocumentUploaded)
def index(event: DocumentUploaded, ctx) -> None:
    data = BlobStore.default().get(event.blob_ref)  # raises (and is retried) if the blob is missing
    _index[event.doc_id] = summarize(event.doc_id, data, ctx.instance)


@indexer.query(GetDocument)
def get_document(query: GetDocument) -> DocumentInfo | None:
    return _index.get(query.doc_id)
