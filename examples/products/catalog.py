"""catalog: the product catalogue, kept from the product events; run as several instances.

Each instance owns a share of the partitions, so each holds a share of the products; every
event of one product goes to the same instance and is handled after the one before it, even
though the handler is async and events of *other* products overtake each other freely (it
sleeps a random moment, as a handler waiting on a database would). An update that arrives for
a product it does not know, or not right after the previous version, would be an ordering bug:
the handler raises, and the test looks for any failed attempt.
"""

import asyncio
import random

from choreo import Service

from .messages import GetProduct, Product, ProductCreated, ProductUpdated

catalog = Service("catalog")

_products: dict[str, Product] = {}


class OutOfOrder(Exception):
    """An event of a product arrived before the one it follows."""


@catalog.on(ProductCreated)
async def created(event: ProductCreated) -> None:
    await asyncio.sleep(random.random() * 0.002)
    if event.product_id in _products:
        raise OutOfOrder(f"{event.product_id} created twice")
    _products[event.product_id] = Product(event.product_id, event.name, event.price_cents, 1)


@catalog.on(ProductUpdated)
async def updated(event: ProductUpdated) -> None:
    await asyncio.sleep(random.random() * 0.002)
    product = _products.get(event.product_id)
    if product is None:
        raise OutOfOrder(f"update {event.version} of {event.product_id} before it was created")
    if event.version != product.version + 1:
        raise OutOfOrder(f"update {event.version} of {event.product_id} after version {product.version}")
    _products[event.product_id] = Product(
        event.product_id,
        product.name if event.name is None else event.name,
        product.price_cents if event.price_cents is None else event.price_cents,
        event.version,
    )


@catalog.query(GetProduct)
def get_product(query: GetProduct) -> Product | None:
    return _products.get(query.product_id)
