"""The customer portal: requests quotes, gets an id back at once, and polls for the answers."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from choreo import Service

from .messages import GetQuote, QuoteRequested, QuoteStatus
from .pricing import UNIT_CENTS, price

portal = Service("portal", emits=[QuoteRequested], sends=[GetQuote], doc="the customer portal")


@dataclass
class Outcome:
    requests: list[QuoteRequested]
    accepted_seconds: float  # how long the portal took to hand every request over
    replies: dict[str, QuoteStatus] = field(default_factory=dict)
    waited: dict[str, float] = field(default_factory=dict)  # request id -> seconds until ready
    polls_pending: int = 0  # polls that found the quote still pending
    wrong: list[str] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        return 1 if self.wrong or len(self.replies) != len(self.requests) else 0


async def poll(client, request_id: str, started: float, out: Outcome, timeout: float = 20.0) -> None:
    delay = 0.01
    while time.monotonic() - started < timeout:
        status = await client.ask(GetQuote(request_id))
        if status is not None and status.status == "ready":
            out.replies[request_id] = status
            out.waited[request_id] = time.monotonic() - started
            return
        out.polls_pending += 1
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)  # back off, like a client honouring Retry-After


async def drive(client, system, requests: int = 30, seed: int = 2) -> Outcome:
    rng = random.Random(seed)
    todo = [QuoteRequested(f"q{n:03d}", rng.choice(sorted(UNIT_CENTS)), rng.choice([1, 5, 12, 60])) for n in range(requests)]
    started = time.monotonic()
    for request in todo:
        await client.emit(request)  # accepted: nothing waits for the pricing engine
    out = Outcome(todo, time.monotonic() - started)
    await asyncio.gather(*(poll(client, r.request_id, started, out) for r in todo))
    out.wrong = [r.request_id for r in todo
                 if r.request_id not in out.replies or out.replies[r.request_id].price_cents != price(r.product, r.quantity)]
    by = sorted({s.priced_by for s in out.replies.values()})
    print(f"{requests} quote requests accepted in {out.accepted_seconds * 1000:.0f} ms, each with its request id")
    print(f"the portal polled GetQuote: {out.polls_pending} polls found the quote pending; all {len(out.replies)} ready "
          f"after {min(out.waited.values()):.2f} to {max(out.waited.values()):.2f} s, priced by {', '.join(by)}")
    print("every price correct" if not out.wrong else f"WRONG or missing: {out.wrong}")
    return out
