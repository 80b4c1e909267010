"""Product events, keyed by product id: every event of one product is handled in order."""

from __future__ import annotations

import msgspec

from choreo import Event, Query


class ProductCreated(Event, key="product_id"):
    product_id: str
    name: str
    price_cents: int


class ProductUpdated(Event, key="product_id"):
    """A change to a product; ``version`` counts the product's events (ProductCreated is 1)."""

    product_id: str
    version: int
    name: str | None = None
    price_cents: int | None = None


class Product(msgspec.Struct, frozen=True):
    product_id: str
    name: str
    price_cents: int
    version: int


class GetProduct(Query, key="product_id", returns=Product | None):
    """Routed by key, like the events: it reaches the instance that holds the product."""

    product_id: str
