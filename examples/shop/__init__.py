"""The shop: a flaky mobile client retries its orders, and each order is still placed once.

The article's story. The phones POST their orders to the api, which names each order after its
intent (customer + cart) and hands it to orders as a CreateOrder. Answers get lost and the
phones retry, each time under a new request id from the API gateway; CreateOrder's idempotency
key is the intent, so orders handles each checkout once. Then inventory reserves stock, payments
charges (or declines), shipping ships, notifications tells the customer, and orders keeps the
read model GetOrder answers from. Every service that remembers something keeps it in ``ctx.state``
under a message key (an order, a SKU, the order book), so it moves with its partition; see each
service's docstring for how its keys are chosen.

    choreo up examples/shop                       # 40 orders from 4 phones, 30 % of answers lost
    choreo up examples/shop -o orders=400 -o loss=0.5
    choreo up examples/shop --port 7400 -o orders=3000 -o rate=30   # paced: watch it with choreo top
    choreo graph examples.shop
"""

from .mobile import drive

SYSTEM = {"api": 2, "orders": 1, "inventory": 1, "payments": 1, "shipping": 1, "notifications": 1}
CLIENT = "mobile"

__all__ = ["SYSTEM", "CLIENT", "drive"]
