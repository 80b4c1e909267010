"""The support desk changes customers' addresses, then checks labels and the audit trail."""

from __future__ import annotations

import random

from choreo import Service

from .messages import ChangeAddress, GetLabel, GetTrail

support = Service("support", sends=[ChangeAddress, GetLabel, GetTrail], doc="the support desk's tool")

STREETS = ["Elm St", "Canal Rd", "Harbour Way", "Mill Lane", "Station Sq", "Oak Ave"]


def changes(customers: int, per_customer: int, seed: int) -> list[ChangeAddress]:
    rng = random.Random(seed)
    out = [
        ChangeAddress(f"c{c:02d}", f"ch{k}", f"{rng.randint(1, 200)} {rng.choice(STREETS)}")
        for k in range(per_customer)
        for c in range(customers)
    ]
    return out


async def drive(client, system, customers: int = 12, per_customer: int = 3, seed: int = 5) -> int:
    todo = changes(customers, per_customer, seed)
    for cmd in todo:
        await client.send(cmd)
    latest = {cmd.customer_id: cmd.address for cmd in todo}
    labels = {cid: await client.ask(GetLabel(cid)) for cid in latest}
    trail = await client.ask(GetTrail())
    wrong = {cid: label for cid, label in labels.items() if label != latest[cid]}
    handled = system.total("processed", "customers")
    print(f"{len(todo)} address changes, each announced by a thin AddressChanged (customer id and change id only)")
    print(f"shipping called back customers for the address: customers handled {handled} messages "
          f"({len(todo)} changes, {handled - len(todo)} GetCustomer call-backs)")
    print(f"audit recorded {len(trail)} changes without calling back")
    if wrong or len(trail) != len(todo):
        print(f"WRONG: labels {wrong}, trail {len(trail)} of {len(todo)}")
        return 1
    print(f"every label shows its customer's latest address ({len(labels)} customers)")
    return 0
