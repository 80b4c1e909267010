"""accounts: keeps each account as its log of events, in ``ctx.state`` under the account's key.

Every command of an account is keyed by it, so one handler at a time appends to its log; the
balance is a fold of the log (:mod:`.ledger`). The log moves with the account's partition when
instances come and go, and has a standby copy on another instance (``replicas=1``), so a
restart or a crash of an instance loses no event.
"""

from choreo import Service

from . import ledger
from .ledger import AccountLog
from .messages import AccountView, Deposit, GetAccount, GetHistory, Receipt, Withdraw

accounts = Service("accounts", state=[AccountLog], replicas=1)


def _handle(cmd: Deposit | Withdraw, ctx) -> Receipt:
    log, answer = ledger.handle(ctx.state.get(AccountLog) or AccountLog(), cmd)
    if log is not None:
        ctx.state.put(log)
    return answer


@accounts.command(Deposit)
def deposit(cmd: Deposit, ctx) -> Receipt:
    return _handle(cmd, ctx)


@accounts.command(Withdraw)
def withdraw(cmd: Withdraw, ctx) -> Receipt:
    return _handle(cmd, ctx)


@accounts.query(GetAccount)
def get_account(query: GetAccount, ctx) -> AccountView | None:
    log = ctx.state.get(AccountLog)
    if log is None:
        return None
    account = ledger.fold(log.events)
    return AccountView(query.account_id, account.balance_cents, account.version, ctx.instance)


@accounts.query(GetHistory)
def get_history(query: GetHistory, ctx) -> list[str]:
    return ledger.history(ctx.state.get(AccountLog) or AccountLog())
