"""Reference data every service of the shop agrees on (in a real shop: its own services)."""

PRICES = {  # cents
    "mug": 1200,
    "tee": 2500,
    "cap": 1800,
    "sticker": 300,
    "poster": 1500,
    "hoodie": 5400,
}

# Units on hand when the shop opens: plenty of everything but the hoodie, which sells out early.
INITIAL_STOCK = {"mug": 5000, "tee": 5000, "cap": 5000, "sticker": 20000, "poster": 5000, "hoodie": 10}

# What each customer's card accepts per order; above it, the payment is declined.
CARD_LIMITS = {f"c{n:02d}": 20_000 for n in range(1, 13)} | {"c07": 4_000, "c11": 5_000}


def order_id(customer_id: str, cart_id: str) -> str:
    """The order's id follows from the intent (customer + cart), so every retry gets the same one."""
    return f"{customer_id}-{cart_id}"


def total_cents(lines) -> int:
    return sum(PRICES[line.sku] * line.qty for line in lines)
