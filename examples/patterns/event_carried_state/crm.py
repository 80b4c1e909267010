"""The CRM edits customers; the finance desk asks billing for invoices. Then customers crashes."""

from __future__ import annotations

import random
from dataclasses import dataclass

from choreo import Service

from .messages import Invoice, IssueInvoice, UpdateCustomer

crm = Service("crm", sends=[UpdateCustomer, IssueInvoice], doc="the CRM and the finance desk")

NAMES = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Ken", "Margaret", "Dennis"]
STREETS = ["Elm St", "Canal Rd", "Harbour Way", "Mill Lane", "Station Sq", "Oak Ave"]


@dataclass
class Outcome:
    before: list[Invoice]  # issued while customers was up
    after: list[Invoice]  # issued after it was killed
    wrong: list[Invoice]  # not billed to the customer's latest name and address

    @property
    def exit_status(self) -> int:
        return 1 if self.wrong else 0


def updates(customers: int, versions: int, seed: int) -> list[UpdateCustomer]:
    rng = random.Random(seed)
    return [
        UpdateCustomer(f"c{c:02d}", v, f"{rng.choice(NAMES)} {chr(65 + c)}.", f"{rng.randint(1, 99)} {rng.choice(STREETS)}")
        for v in range(1, versions + 1)
        for c in range(customers)
    ]


async def drive(client, system, customers: int = 8, versions: int = 3, seed: int = 3) -> Outcome:
    todo = updates(customers, versions, seed)
    for cmd in todo:
        await client.send(cmd)
    latest = {u.customer_id: f"{u.name}, {u.address}" for u in todo}
    before = [await client.send(IssueInvoice(f"inv-{cid}-1", cid, 1000)) for cid in latest]
    print(f"{len(todo)} customer updates, each CustomerUpdated carrying the full new state")
    print(f"billing issued {len(before)} invoices from its own copy, without asking customers")

    await client.flush()  # nothing of ours in flight to customers: what follows is billing's doing alone
    victim = system.running("customers")[0]
    await system.kill(victim)  # a crash: customers is gone, no goodbye
    print(f"{victim.name} killed (pid {victim.pid}); billing does not need it:")
    after = [await client.send(IssueInvoice(f"inv-{cid}-2", cid, 2500)) for cid in latest]
    wrong = [i for i in before + after if i.bill_to != latest[i.customer_id]]
    print(f"billing issued {len(after)} more invoices while customers was down"
          + (f"; WRONG: {wrong[:3]}" if wrong else ", all to the latest address"))
    return Outcome(before, after, wrong)
