"""accounts: one instance, whose state lives in its event log, ``$CHOREO_DATA_DIR/accounts.jsonl``.

The ledger is loaded (the log replayed) on the first message after the process starts.
"""

import os
from pathlib import Path

from choreo import Service

from .ledger import EventLog, Ledger
from .messages import AccountView, Deposit, GetAccount, GetHistory, Receipt, Withdraw

accounts = Service("accounts")

_ledger: Ledger | None = None


def ledger() -> Ledger:
    global _ledger
    if _ledger is None:
        directory = Path(os.environ.get("CHOREO_DATA_DIR", "choreo-data"))  # choreo up sets it for every process
        _ledger = Ledger.load(EventLog(directory / "accounts.jsonl"))
    return _ledger


@accounts.command(Deposit)
def deposit(cmd: Deposit) -> Receipt:
    return ledger().handle(cmd)


@accounts.command(Withdraw)
def withdraw(cmd: Withdraw) -> Receipt:
    return ledger().handle(cmd)


@accounts.query(GetAccount)
def get_account(query: GetAccount, ctx) -> AccountView | None:
    account = ledger().accounts.get(query.account_id)
    if account is None:
        return None
    return AccountView(query.account_id, account.balance_cents, account.version, ledger().replayed, ctx.instance)


@accounts.query(GetHistory)
def get_history(query: GetHistory) -> list[str]:
    return list(ledger().history.get(query.account_id, []))
