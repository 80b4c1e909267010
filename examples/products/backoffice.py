"""The back office where products are created and edited: it emits the product events.

``product_events(products, seed)`` is the stream: every product is created, then updated a few
times (name, price or both), and the products' streams are shuffled together, as edits from many
people would be, while each product's own events keep their order. The same seed, the same stream.
"""

from __future__ import annotations

import random
import time

from choreo import Service

from .messages import GetProduct, Product, ProductCreated, ProductUpdated

backoffice = Service("backoffice", emits=[ProductCreated, ProductUpdated], sends=[GetProduct],
                     doc="where staff create and edit products")

ADJECTIVES = ["red", "blue", "tiny", "grand", "quiet", "rapid", "woolen", "golden"]
NOUNS = ["mug", "lamp", "chair", "kettle", "scarf", "clock", "vase", "desk"]


def product_events(products: int, seed: int) -> list[ProductCreated | ProductUpdated]:
    rng = random.Random(seed)
    streams = []
    for n in range(products):
        pid = f"p{n:04d}"
        stream: list[ProductCreated | ProductUpdated] = [
            ProductCreated(pid, f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}", rng.randint(500, 9000))
        ]
        for version in range(2, rng.randint(2, 9) + 1):
            change = rng.choice(["name", "price", "both"])
            stream.append(ProductUpdated(
                pid, version,
                name=f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}" if change != "price" else None,
                price_cents=rng.randint(500, 9000) if change != "name" else None,
            ))
        streams.append(stream)
    # shuffle the streams together: pick a random product's next event until all are out
    out = []
    live = [s[::-1] for s in streams]
    while live:
        i = rng.randrange(len(live))
        out.append(live[i].pop())
        if not live[i]:
            live[i] = live[-1]
            live.pop()
    return out


def final_states(events: list[ProductCreated | ProductUpdated]) -> dict[str, Product]:
    """What every product must look like once all its events are applied, in order."""
    state: dict[str, Product] = {}
    for e in events:
        if isinstance(e, ProductCreated):
            state[e.product_id] = Product(e.product_id, e.name, e.price_cents, 1)
        else:
            p = state[e.product_id]
            state[e.product_id] = Product(p.product_id, e.name or p.name,
                                          p.price_cents if e.price_cents is None else e.price_cents, e.version)
    return state


async def drive(client, system, products: int = 300, seed: int = 11) -> int:
    """Emit every product's events, interleaved, as fast as credit allows; then read every product back."""
    events = product_events(products, seed)
    started = time.monotonic()
    for event in events:
        await client.emit(event)
    await client.flush(timeout=60)
    elapsed = time.monotonic() - started
    stats = system.stats("catalog")
    expected = final_states(events)
    wrong = []
    for pid, want in expected.items():
        got = await client.ask(GetProduct(pid))
        if got != want:
            wrong.append(f"{pid}: {got} instead of {want}")
    print(f"backoffice: {len(events)} events for {products} products emitted and handled in {elapsed:.2f} s")
    print("catalog: " + ", ".join(f"{name} handled {s['processed']}" for name, s in stats.items())
          + f"; failed attempts {sum(s['failed_attempts'] for s in stats.values())}")
    if wrong:
        print(f"{len(wrong)} products are not at their last update, e.g.\n  " + "\n  ".join(wrong[:5]))
        return 1
    print(f"every product's state is its last update ({products} products read back with GetProduct)")
    return 0
