"""A healthy service and a driver that reports failure (exit status 4) through its outcome."""

import os
from dataclasses import dataclass

from choreo import Query, Service


class Ping(Query):
    pass


echo = Service("echo")
pinger = Service("pinger", sends=[Ping])


@echo.query(Ping)
def ping(query: Ping) -> str:
    return os.environ["ECHO_WORD"]  # from ENV below


SYSTEM = {"echo": 1}
CLIENT = "pinger"
ENV = {"ECHO_WORD": "pong"}


@dataclass
class Outcome:
    answer: str
    exit_status: int = 4


async def drive(client, system, fail: bool = True):
    answer = await client.ask(Ping())
    print(f"driver: echo answered {answer!r}", flush=True)
    return Outcome(answer, 4 if fail else 0)
