"""A service that dies (exit status 3) when told to: choreo up must notice, report, stop the rest."""

import os
import sys

from choreo import Command, Service


class Crash(Command):
    why: str


victim = Service("victim")
bystander = Service("bystander")
tester = Service("tester", sends=[Crash])


@victim.command(Crash)
def crash(cmd: Crash) -> None:
    print(f"victim: crashing on purpose ({cmd.why})", file=sys.stderr, flush=True)
    os._exit(3)


SYSTEM = {"victim": 1, "bystander": 2}
CLIENT = "tester"


async def drive(client, system) -> int:
    print("driver: telling the victim to crash", flush=True)
    try:
        await client.send(Crash("a test"), timeout=30)
    except Exception as exc:  # the victim never answers; choreo up stops us first
        print(f"driver: {type(exc).__name__}", flush=True)
    return 0
