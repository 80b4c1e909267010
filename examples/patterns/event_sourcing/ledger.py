"""The account ledger, event-sourced: an account's state is a fold over its own events.

``decide`` turns a command into an event (checking the rules against the current state),
``evolve`` applies an event to the state. Nothing else changes the state: a handled command
appends its event to the account's :class:`AccountLog` (what the service keeps in ``ctx.state``
under the account's key) and answers with the state that follows. The log also holds every
transaction id, so a transaction retried long after (when the node's dedup window has
forgotten it) is still recognised, and answered as the first time.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from .messages import Deposit, Receipt, Withdraw


class Deposited(msgspec.Struct, frozen=True, tag=True):
    account_id: str
    tx_id: str
    amount_cents: int


class Withdrawn(msgspec.Struct, frozen=True, tag=True):
    account_id: str
    tx_id: str
    amount_cents: int


class WithdrawalRefused(msgspec.Struct, frozen=True, tag=True):
    account_id: str
    tx_id: str
    amount_cents: int
    reason: str


AccountEvent = Deposited | Withdrawn | WithdrawalRefused


class AccountLog(msgspec.Struct, frozen=True):
    """One account's events, oldest first: the whole of its state."""

    events: list[AccountEvent] = []


@dataclass
class Account:
    balance_cents: int = 0
    version: int = 0  # how many events it has


def evolve(account: Account, event: AccountEvent) -> Account:
    if isinstance(event, Deposited):
        return Account(account.balance_cents + event.amount_cents, account.version + 1)
    if isinstance(event, Withdrawn):
        return Account(account.balance_cents - event.amount_cents, account.version + 1)
    return Account(account.balance_cents, account.version + 1)


def fold(events: list[AccountEvent]) -> Account:
    account = Account()
    for event in events:
        account = evolve(account, event)
    return account


def decide(account: Account, cmd: Deposit | Withdraw) -> AccountEvent:
    if cmd.amount_cents <= 0:
        raise ValueError(f"{cmd.tx_id}: amount must be positive, got {cmd.amount_cents}")
    if isinstance(cmd, Deposit):
        return Deposited(cmd.account_id, cmd.tx_id, cmd.amount_cents)
    if account.balance_cents < cmd.amount_cents:
        return WithdrawalRefused(cmd.account_id, cmd.tx_id, cmd.amount_cents, f"balance {account.balance_cents} is too low")
    return Withdrawn(cmd.account_id, cmd.tx_id, cmd.amount_cents)


def receipt(event: AccountEvent, after: Account, note: str = "") -> Receipt:
    accepted = not isinstance(event, WithdrawalRefused)
    return Receipt(event.tx_id, event.account_id, accepted, after.balance_cents, after.version,
                   note or ("" if accepted else event.reason))


def handle(log: AccountLog, cmd: Deposit | Withdraw) -> tuple[AccountLog | None, Receipt]:
    """The account's new log (None: unchanged) and the command's receipt."""
    account = Account()
    for event in log.events:
        account = evolve(account, event)
        if event.tx_id == cmd.tx_id:  # already in the log: answer as the first time, change nothing
            first = receipt(event, account)
            return None, receipt(event, account, "already done: " + (first.note or "accepted"))
    event = decide(account, cmd)
    return AccountLog([*log.events, event]), receipt(event, evolve(account, event))


def history(log: AccountLog) -> list[str]:
    """How the account got where it is, one line per event."""
    lines, account = [], Account()
    for event in log.events:
        account = evolve(account, event)
        lines.append(f"{type(event).__name__} {event.amount_cents} ({event.tx_id}) -> {account.balance_cents}")
    return lines
