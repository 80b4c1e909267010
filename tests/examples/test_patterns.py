"""examples/patterns: each pattern's system runs as processes and does what its README says.

Each test runs the example's driver, then checks the outcome with facts the driver does not
vouch for: the test's own client queries, the nodes' stats, files on disk, processes' fates.
"""

from __future__ import annotations

from collections import Counter

import pytest

from example_run import ask_all, drive, run, standbys_complete

from choreo import NodeConfig

pytestmark = pytest.mark.slow  # real processes


def test_event_notification(up) -> None:
    from examples.patterns.event_notification.messages import GetLabel, GetTrail
    from examples.patterns.event_notification.support import changes

    system = up("examples.patterns.event_notification")
    assert drive(system, customers=12, per_customer=3, seed=5) == 0
    todo = changes(12, 3, 5)
    # the price of thin events: customers answered one GetCustomer call-back per change
    assert system.total("processed", "customers") == 2 * len(todo)
    latest = {c.customer_id: c.address for c in todo}
    *labels, trail = run(ask_all(system, [*(GetLabel(cid) for cid in latest), GetTrail()]))
    assert labels == list(latest.values())
    assert sorted(trail) == sorted(f"{c.customer_id}/{c.change_id}" for c in todo)


def test_event_carried_state_survives_the_source_dying(up) -> None:
    from examples.patterns.event_carried_state.crm import updates
    from examples.patterns.event_carried_state.messages import IssueInvoice

    system = up("examples.patterns.event_carried_state")
    out = drive(system, customers=8, versions=3, seed=3)
    latest = {u.customer_id: f"{u.name}, {u.address}" for u in updates(8, 3, 3)}
    assert out.wrong == [] and len(out.after) == 8
    customers = [i for i in system.instances if i.service == "customers"]
    assert len(customers) == 1 and customers[0].returncode == -9  # killed, really gone
    assert system.running("customers") == []

    async def invoice_now():
        async with system.client() as node:
            return [await node.send(IssueInvoice(f"inv-{cid}-test", cid, 99)) for cid in latest]

    invoices = run(invoice_now())
    assert {i.customer_id: i.bill_to for i in invoices} == latest


def test_load_leveling(up) -> None:
    from examples.patterns.load_leveling.messages import GetRenderStats
    from examples.patterns.load_leveling.thumbnailer import RENDER_SECONDS, SLOTS

    system = up("examples.patterns.load_leveling")
    images = 600
    out = drive(system, images=images)
    (stats,) = run(ask_all(system, [GetRenderStats()]))
    assert stats.rendered == images
    assert stats.peak_at_once <= SLOTS  # the worker's limit held, whatever the burst
    render = stats.last_at - stats.first_at
    assert render >= 0.9 * images * RENDER_SECONDS / SLOTS  # at its own pace, no faster
    assert out.burst_seconds < 0.2 * render  # the producer did not wait for it
    assert out.peak_lag >= images // 2  # the burst waited in the queue...
    assert system.total("processed", "thumbnailer") >= images
    assert sum(sum(s["lag"].values()) for s in system.stats("thumbnailer").values()) == 0  # ...which drained


def test_async_request_reply(up) -> None:
    from examples.patterns.async_request_reply.messages import GetQuote
    from examples.patterns.async_request_reply.pricing import price

    system = up("examples.patterns.async_request_reply")
    out = drive(system, requests=30, seed=2)
    assert out.wrong == [] and len(out.replies) == 30
    assert out.accepted_seconds < min(out.waited.values())  # accepted before any reply existed
    assert out.polls_pending > 0  # the caller really did come back for the answer
    assert {s.priced_by for s in out.replies.values()} == {"pricing#1", "pricing#2"}
    answers = run(ask_all(system, [GetQuote(r.request_id) for r in out.requests]))
    assert [a.price_cents for a in answers] == [price(r.product, r.quantity) for r in out.requests]


def test_claim_check(up) -> None:
    from examples.patterns.claim_check.messages import GetDocument
    from examples.patterns.claim_check.uploader import document

    system = up("examples.patterns.claim_check")
    out = drive(system, documents=6, seed=4)
    assert out.wrong == []
    assert min(out.sizes.values()) > NodeConfig().max_message_bytes  # too big to travel as a message
    assert out.event_bytes < 200  # what travelled: the claim check
    blobs = [p for p in (system.data_dir / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == 6 and sum(p.stat().st_size for p in blobs) == sum(out.sizes.values())
    infos = run(ask_all(system, [GetDocument(f"doc{n:02d}") for n in range(6)]))
    assert [i.words for i in infos] == [len(document(n, 4).split()) for n in range(6)]
    # each document went to the indexer owning its key's partition (six keys over two instances
    # may all land on one of them: which one owns what depends on the instances' random ids)
    indexers = {i.name for i in system.instances if i.service == "indexer"}
    assert {i.indexed_by for i in infos} <= indexers, (infos, indexers)


def test_event_sourcing_keeps_every_event_across_a_restart(up) -> None:
    from examples.patterns.event_sourcing.teller import transactions

    system = up("examples.patterns.event_sourcing")
    out = drive(system, count=60, accounts=5, seed=9)
    assert out.problems == []
    (old, *others) = [i for i in system.instances if i.service == "accounts" and not i.alive()]
    assert not others and old.returncode == 0 and len(system.running("accounts")) == 2
    moved = [a for a, v in out.before_restart.items() if v.instance == old.name]
    assert moved, "the restarted instance held no account: the restart tested nothing"
    assert {out.after_restart[a].instance for a in moved} <= {i.name for i in system.running("accounts")}
    assert {a: (v.balance_cents, v.version) for a, v in out.after_restart.items()} == \
        {a: (v.balance_cents, v.version) for a, v in out.before_restart.items()}
    first = out.receipts[1]  # the retry across the restart: the first answer again, no new event
    assert out.retried is not None and (out.retried.accepted, out.retried.balance_cents, out.retried.version) == \
        (first.accepted, first.balance_cents, first.version)
    assert_ledger_is_the_fold(system, transactions(60, 5, 9))


def assert_ledger_is_the_fold(system, txs) -> None:
    """Every account holds exactly one event per transaction of its own, in order, and its
    balance is the model's: the state is the fold of all the events, none lost or doubled."""
    from examples.patterns.event_sourcing.messages import Deposit, GetAccount, GetHistory
    from examples.patterns.event_sourcing.teller import model

    balances, accepted = model(txs)
    ids = sorted(balances)
    views = run(ask_all(system, [GetAccount(a) for a in ids]))
    histories = run(ask_all(system, [GetHistory(a) for a in ids]))
    assert {v.account_id: v.balance_cents for v in views} == balances
    for a, history in zip(ids, histories):
        mine = [tx for tx in txs if tx.account_id == a]
        kinds = ["Deposited" if isinstance(tx, Deposit) else "Withdrawn" if accepted[tx.tx_id] else "WithdrawalRefused"
                 for tx in mine]
        assert [(line.split()[0], line.split()[2]) for line in history] == \
            [(k, f"({tx.tx_id})") for k, tx in zip(kinds, mine)], (a, history)
    assert {line.split()[0] for h in histories for line in h} == {"Deposited", "Withdrawn", "WithdrawalRefused"}


def test_event_sourcing_loses_no_event_when_an_instance_is_killed(up) -> None:
    from examples.patterns.event_sourcing.messages import GetAccount
    from examples.patterns.event_sourcing.teller import model, transactions

    system = up("examples.patterns.event_sourcing")
    txs = transactions(80, 6, 4)
    ids = sorted({tx.account_id for tx in txs})

    async def scenario() -> list:
        receipts = []
        async with system.client() as client:
            for n, tx in enumerate(txs):
                if n == len(txs) // 2:  # mid-stream: SIGKILL the instance that holds most accounts
                    await standbys_complete(system, ["accounts"])
                    owners = Counter(v.instance for v in [await client.ask(GetAccount(a)) for a in ids] if v)
                    (victim,) = [i for i in system.running("accounts") if i.name == owners.most_common(1)[0][0]]
                    await system.kill(victim)
                receipts.append(await client.send(tx, timeout=30))
        return receipts

    receipts = run(scenario(), timeout=90)
    assert len(system.running("accounts")) == 1
    assert [i.returncode for i in system.instances if i.service == "accounts" and not i.alive()] == [-9]
    assert [r.accepted for r in receipts] == [model(txs)[1][tx.tx_id] for tx in txs]
    assert_ledger_is_the_fold(system, txs)


def test_cqrs(up) -> None:
    from examples.patterns.cqrs.helpdesk import model, script

    system = up("examples.patterns.cqrs")
    out = drive(system, tickets=25, seed=8)
    assert out.problems == []
    decisions, _, _ = model(script(25, 8))
    assert [d.accepted for d in out.decisions] == decisions and not all(decisions)  # some refused
    events = sum(decisions)
    replicas = system.stats("dashboard")
    # the read model is partitioned: the two instances share the events (and the lane commands)
    assert len(replicas) == 2 and all(s["processed"] > 0 for s in replicas.values())
    assert sum(s["processed"] for s in replicas.values()) >= events
    assert_read_model_is_the_fold(system, script(25, 8))


def assert_read_model_is_the_fold(system, commands) -> None:
    """Every lane holds exactly the tickets the model of the accepted commands puts there, in order."""
    from examples.patterns.cqrs.helpdesk import AGENTS, model
    from examples.patterns.cqrs.messages import CLOSED, UNASSIGNED, GetLane, GetWorkload

    _, workload, (unassigned, assigned, closed) = model(commands)
    rows = run(ask_all(system, [GetWorkload(a) for a in AGENTS]))
    assert {a: [r.ticket_id for r in rs] for a, rs in zip(AGENTS, rows) if rs} == workload
    lanes = run(ask_all(system, [GetLane(UNASSIGNED), GetLane(CLOSED)]))
    assert [len(lane.rows) for lane in lanes] == [unassigned, closed]
    assert sum(len(rs) for rs in rows) == assigned
    ids = [r.ticket_id for rs in rows for r in rs] + [r.ticket_id for lane in lanes for r in lane.rows]
    assert sorted(ids) == sorted({c.ticket_id for c in commands}), "a ticket in no lane, or in two"


def test_cqrs_read_model_survives_a_killed_instance(up) -> None:
    from examples.patterns.cqrs.helpdesk import AGENTS, script
    from examples.patterns.cqrs.messages import CLOSED, UNASSIGNED, GetLane

    system = up("examples.patterns.cqrs")
    commands = script(40, 3)

    async def scenario() -> None:
        async with system.client() as client:
            for n, cmd in enumerate(commands):
                if n == len(commands) // 2:  # mid-stream: SIGKILL the instance that holds most lanes
                    await standbys_complete(system, ["dashboard"])
                    lanes = [await client.ask(GetLane(lane)) for lane in [UNASSIGNED, *AGENTS, CLOSED]]
                    owners = Counter(lane.answered_by for lane in lanes)
                    (victim,) = [i for i in system.running("dashboard") if i.name == owners.most_common(1)[0][0]]
                    await system.kill(victim)
                await client.send(cmd, timeout=30)

    run(scenario(), timeout=90)
    assert len(system.running("dashboard")) == 1
    assert [i.returncode for i in system.instances if i.service == "dashboard" and not i.alive()] == [-9]
    assert_read_model_is_the_fold(system, commands)


def test_stream_processing(up) -> None:
    from examples.patterns.stream_processing.messages import GetWindows
    from examples.patterns.stream_processing.sensors import readings, reference

    system = up("examples.patterns.stream_processing")
    out = drive(system, count=12, seconds=6.0, seed=6)
    assert out.wrong == []
    stream = readings(12, 6.0, 6)
    expected = reference(stream)
    assert len(stream) - sum(w.count for ws in expected.values() for w in ws) > 0  # some came too late
    got = run(ask_all(system, [GetWindows(sid) for sid in sorted(expected)]))
    assert dict(zip(sorted(expected), got)) == expected
    assert all(s["processed"] > 0 for s in system.stats("aggregator").values())
