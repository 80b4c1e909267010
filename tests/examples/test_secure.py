"""examples/shop as a secure mesh (System(secure=True), what ``choreo up --secure`` runs): every
process speaks CURVE with a key of its own, and the shop still reaches its consistent outcome."""

from __future__ import annotations

import pytest

from example_run import ask_all, drive, run

from choreo.client import rpc
from choreo.errors import ChoreoUsageError
from choreo.trust import read_key_directory
from examples.shop.messages import GetOrder

pytestmark = pytest.mark.slow  # real processes


def test_the_shop_runs_secure_to_its_consistent_outcome(up) -> None:
    system = up("examples.shop", secure=True)
    endpoints = system.endpoints()
    assert len(endpoints) == 7 and all(e.split("@")[0] == i.name.replace("#", "-")
                                       for e, i in zip(endpoints, system.running()))
    out = drive(system, orders=30, phones=3, loss=0.3, double_tap=0.1, seed=3)
    assert out.problems == [], out.problems
    assert system.total("duplicates", "orders") >= out.attempts - 30
    # the test's own client joins with the driver's key and reads the outcome
    views = run(ask_all(system, [GetOrder(order_id=oid) for oid in out.traces]))
    assert all(v is not None and v.status in ("shipped", "cancelled") for v in views)
    # the rights written for the run: a key per instance for its own service, the driver's entry point
    policy = {name: cert.permissions for name, cert in read_key_directory(system.keys_dir).items()}
    assert policy["orders-1"].serves == {"orders"} and policy["api-2"].serves == {"api"}
    assert policy["driver"].originates == {"PlaceOrder"} | {q for q in policy["driver"].originates if q.startswith("Get")}
    assert policy["ops"].admin == {"*"}
    # nothing answers without a key
    with pytest.raises(ChoreoUsageError, match="secure mesh"):
        rpc(system.seed, "stats")
    keys_dir = system.keys_dir
    system.stop(timeout=10)
    assert not keys_dir.exists()
