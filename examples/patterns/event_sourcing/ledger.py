"""The account ledger, event-sourced: its state is a fold over its own event log.

``decide`` turns a command into an event (checking the rules against the current state),
``evolve`` applies an event to the state. Nothing else changes the state: a handled command
appends its event to the log (a file, flushed and fsync'ed *before* the command is answered
and acknowledged), then evolves the state with it. A process that starts reads the log and
evolves an empty state through every event in it: the same state, rebuilt. The log also holds
every transaction id, so a transaction retried after a restart (when the node's in-memory
dedup window is gone) is still recognised.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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


class EventLog:
    """An append-only file of JSON lines, one event each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._decoder = msgspec.json.Decoder(AccountEvent)
        self._file = None

    def replay(self) -> Iterator[AccountEvent]:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a crash in the middle of an append: that event was never acknowledged
                yield self._decoder.decode(line)

    def append(self, event: AccountEvent) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")
        self._file.write(msgspec.json.encode(event) + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())


@dataclass
class Account:
    balance_cents: int = 0
    version: int = 0


@dataclass
class Ledger:
    log: EventLog
    accounts: dict[str, Account] = field(default_factory=dict)
    receipts: dict[str, Receipt] = field(default_factory=dict)  # tx id -> its receipt
    history: dict[str, list[str]] = field(default_factory=dict)
    replayed: int = 0

    @classmethod
    def load(cls, log: EventLog) -> Ledger:
        ledger = cls(log)
        for event in log.replay():
            ledger.evolve(event)
            ledger.replayed += 1
        return ledger

    def decide(self, cmd: Deposit | Withdraw) -> AccountEvent:
        if cmd.amount_cents <= 0:
            raise ValueError(f"{cmd.tx_id}: amount must be positive, got {cmd.amount_cents}")
        if isinstance(cmd, Deposit):
            return Deposited(cmd.account_id, cmd.tx_id, cmd.amount_cents)
        balance = self.accounts.get(cmd.account_id, Account()).balance_cents
        if balance < cmd.amount_cents:
            return WithdrawalRefused(cmd.account_id, cmd.tx_id, cmd.amount_cents, f"balance {balance} is too low")
        return Withdrawn(cmd.account_id, cmd.tx_id, cmd.amount_cents)

    def evolve(self, event: AccountEvent) -> Receipt:
        account = self.accounts.setdefault(event.account_id, Account())
        if isinstance(event, Deposited):
            account.balance_cents += event.amount_cents
        elif isinstance(event, Withdrawn):
            account.balance_cents -= event.amount_cents
        account.version += 1
        accepted = not isinstance(event, WithdrawalRefused)
        receipt = Receipt(event.tx_id, event.account_id, accepted, account.balance_cents, account.version,
                          "" if accepted else event.reason)
        self.receipts[event.tx_id] = receipt
        self.history.setdefault(event.account_id, []).append(
            f"{type(event).__name__} {event.amount_cents} ({event.tx_id}) -> {account.balance_cents}"
        )
        return receipt

    def handle(self, cmd: Deposit | Withdraw) -> Receipt:
        done = self.receipts.get(cmd.tx_id)
        if done is not None:  # already in the log: answer as the first time, change nothing
            return Receipt(done.tx_id, done.account_id, done.accepted, done.balance_cents, done.version,
                           "already done: " + (done.note or "accepted"))
        event = self.decide(cmd)
        self.log.append(event)  # durable first...
        return self.evolve(event)  # ...then the state
