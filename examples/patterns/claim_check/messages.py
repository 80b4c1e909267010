"""Claim check: the event carries a reference to the document, not the document."""

from __future__ import annotations

import msgspec

from choreo import Event, Query


class DocumentUploaded(Event, key="doc_id"):
    doc_id: str
    blob_ref: str  # "sha256:<hex>": the claim check, redeemed at the blob store
    size: int


class DocumentInfo(msgspec.Struct, frozen=True):
    doc_id: str
    size: int
    words: int
    lines: int
    top_word: str
    indexed_by: str


class GetDocument(Query, key="doc_id", returns=DocumentInfo | None):
    doc_id: str
