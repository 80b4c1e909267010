"""Products: ProductCreated and ProductUpdated keyed by product id, two catalog instances, per-key order.

The article's ordering story: related events (a product's creation and its updates) must be
handled in order, unrelated ones need not be. The events are keyed by product id; the catalog
runs as two instances, each owning a share of the partitions, so it scales out while every
product's events still reach one instance, one at a time, in the order they were emitted.

    choreo up examples/products
    choreo up examples/products -o products=2000
"""

from .backoffice import drive

SYSTEM = {"catalog": 2}
CLIENT = "backoffice"

__all__ = ["SYSTEM", "CLIENT", "drive"]
