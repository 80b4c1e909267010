"""Event sourcing: the commands a teller sends, and what they may ask of the accounts."""

from __future__ import annotations

import msgspec

from choreo import Command, Query


class Receipt(msgspec.Struct, frozen=True):
    tx_id: str
    account_id: str
    accepted: bool
    balance_cents: int
    version: int  # how many events the account had after this transaction
    note: str = ""


class Deposit(Command, key="account_id", idempotency=["tx_id"], returns=Receipt):
    tx_id: str
    account_id: str
    amount_cents: int


class Withdraw(Command, key="account_id", idempotency=["tx_id"], returns=Receipt):
    tx_id: str
    account_id: str
    amount_cents: int


class AccountView(msgspec.Struct, frozen=True):
    account_id: str
    balance_cents: int
    version: int  # how many events the account has
    instance: str  # the instance that answered: the one holding the account's partition


class GetAccount(Query, key="account_id", returns=AccountView | None):
    account_id: str


class GetHistory(Query, key="account_id", returns=list[str]):
    """The account's events, oldest first: how it got where it is."""

    account_id: str
