"""examples/products: two catalog instances, events keyed by product id; every product ends at
its last update, and no event ever arrived before the one it follows."""

from __future__ import annotations

import pytest

from example_run import ask_all, drive, run

from examples.products.backoffice import final_states, product_events
from examples.products.messages import GetProduct

pytestmark = pytest.mark.slow  # real processes


def test_every_product_ends_at_its_last_update(up) -> None:
    system = up("examples.products")
    products, seed = 300, 11
    assert drive(system, products=products, seed=seed) == 0
    events = product_events(products, seed)
    expected = final_states(events)
    assert len(events) > 3 * products  # a few updates per product, shuffled together

    got = run(ask_all(system, [GetProduct(pid) for pid in expected]))
    wrong = {pid: g for pid, g in zip(expected, got) if g != expected[pid]}
    assert not wrong, f"{len(wrong)} products not at their last update, e.g. {list(wrong.items())[:3]}"

    stats = system.stats("catalog")
    assert len(stats) == 2
    # an update handled before its predecessor raises in the handler: not one attempt failed
    assert sum(s["failed_attempts"] for s in stats.values()) == 0, stats
    assert sum(s["dead_letters"] for s in stats.values()) == 0
    # both instances did a real share of the work (the events plus the queries routed to them)
    handled = {name: s["processed"] for name, s in stats.items()}
    assert sum(handled.values()) >= len(events) + 2 * products, handled
    assert min(handled.values()) > 0.2 * len(events), handled
