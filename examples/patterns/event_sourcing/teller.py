"""The teller: transactions, a restart of an accounts instance in the middle, and a retry across it."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from choreo import Service

from .messages import AccountView, Deposit, GetAccount, GetHistory, Receipt, Withdraw

teller = Service("teller", sends=[Deposit, Withdraw, GetAccount, GetHistory], doc="the bank's teller app")


def transactions(count: int, accounts: int, seed: int) -> list[Deposit | Withdraw]:
    rng = random.Random(seed)
    out: list[Deposit | Withdraw] = []
    for n in range(count):
        account = f"acc{rng.randrange(accounts)}"
        kind = Deposit if rng.random() < 0.55 else Withdraw
        out.append(kind(f"tx{n:04d}", account, rng.randrange(1, 50) * 100))
    return out


def model(txs: list[Deposit | Withdraw]) -> tuple[dict[str, int], dict[str, bool]]:
    """Balances and which transactions are accepted, computed without choreo (for checking)."""
    balances: dict[str, int] = {}
    accepted = {}
    for tx in txs:
        balance = balances.get(tx.account_id, 0)
        ok = isinstance(tx, Deposit) or balance >= tx.amount_cents
        accepted[tx.tx_id] = ok
        balances[tx.account_id] = balance + (0 if not ok else tx.amount_cents if isinstance(tx, Deposit) else -tx.amount_cents)
    return balances, accepted


@dataclass
class Outcome:
    receipts: list[Receipt] = field(default_factory=list)
    before_restart: dict[str, AccountView] = field(default_factory=dict)
    after_restart: dict[str, AccountView] = field(default_factory=dict)
    retried: Receipt | None = None  # a transaction from before the restart, sent again after it
    final: dict[str, AccountView] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        return 1 if self.problems else 0


async def views(client, account_ids) -> dict[str, AccountView]:
    return {a: await client.ask(GetAccount(a)) for a in sorted(account_ids)}


def _state(views: dict[str, AccountView | None]) -> dict[str, tuple[int, int] | None]:
    return {a: None if v is None else (v.balance_cents, v.version) for a, v in views.items()}


async def drive(client, system, count: int = 60, accounts: int = 5, seed: int = 9) -> Outcome:
    txs = transactions(count, accounts, seed)
    half = count // 2
    ids = {tx.account_id for tx in txs}
    out = Outcome()
    for tx in txs[:half]:
        out.receipts.append(await client.send(tx))
    out.before_restart = await views(client, ids)
    def held(inst) -> list[str]:
        return sorted(a for a, v in out.before_restart.items() if v and v.instance == inst.name)

    old = max(system.running("accounts"), key=lambda inst: len(held(inst)))  # the one holding most accounts
    new = await system.restart(old)
    out.after_restart = await views(client, ids)
    print(f"{half} transactions, then {old.name} (pid {old.pid}) stopped and {new.name} (pid {new.pid}) started: "
          f"its accounts ({', '.join(held(old)) or 'none'}) moved with their events")
    if _state(out.after_restart) != _state(out.before_restart):
        out.problems.append(f"state after the restart differs: {out.before_restart} -> {out.after_restart}")
    out.retried = await client.send(txs[1])  # the teller's retry of an old transaction
    first = out.receipts[1]
    same = (out.retried.accepted, out.retried.balance_cents, out.retried.version) == \
        (first.accepted, first.balance_cents, first.version)
    how = "answered as the first time" + (f" ({out.retried.note})" if out.retried.note else "") if same else "a new answer"
    print(f"retry of {txs[1].tx_id} after the restart: {how}")
    if not same:
        out.problems.append(f"the retry of {txs[1].tx_id} got {out.retried}, the first answer was {first}")
    for tx in txs[half:]:
        out.receipts.append(await client.send(tx))
    out.final = await views(client, ids)
    balances, accepted = model(txs)
    if {a: v.balance_cents for a, v in out.final.items()} != balances:
        out.problems.append(f"balances {out.final} differ from the model {balances}")
    if {r.tx_id: r.accepted for r in out.receipts} != accepted:
        out.problems.append("accepted/refused transactions differ from the model")
    if sum(v.version for v in out.final.values()) != count:
        out.problems.append(f"{sum(v.version for v in out.final.values())} events for {count} transactions")
    refused = sum(not r.accepted for r in out.receipts)
    print(f"{count} transactions: {count - refused} accepted, {refused} withdrawals refused (balance too low)")
    first_id = min(ids)
    print(f"history of {first_id}: " + "; ".join((await client.ask(GetHistory(first_id)))[:4]) + "; ...")
    print("balances: " + ", ".join(f"{a} {v.balance_cents / 100:.2f} ({v.instance})" for a, v in out.final.items()))
    print("every balance matches the model" if not out.problems else "PROBLEMS:\n  " + "\n  ".join(out.problems))
    return out
