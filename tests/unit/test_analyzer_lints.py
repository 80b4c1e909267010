"""Each lint fires on a system broken on purpose, names the culprits and where they are declared,
and stays quiet on a clean system."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # tests/, so analyzer_systems imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyzer_systems.helpers import analysis_of, findings, location, only, source_line

from choreo import Command, Event, Query, Service
from choreo.analyzer import RULES, analyze, lint
from choreo.analyzer._load import collect_services
from choreo.errors import ChoreoUsageError
from choreo.spec import FieldSpec, HandlerSpec, MessageSpec, ServiceSpec, SystemSpec, system_spec


class OrderPlaced(Event, key="order_id"):
    order_id: str


class OrderUpdated(Event, key="order_id"):
    order_id: str
    status: str


class PlaceOrder(Command):
    order_id: str


class ChargeCard(Command, key="order_id"):
    order_id: str


class PaymentFailed(Event, key="order_id"):
    order_id: str


class RetryPayment(Command, key="order_id"):
    order_id: str


class GetOrder(Query, key="order_id"):
    order_id: str


class Welcome(Event):
    user_id: str


@pytest.fixture(scope="module")
def clean():
    return analyze(system_spec(collect_services("analyzer_systems.shop")), name="shop")


def test_the_clean_shop_has_no_findings(clean) -> None:
    assert clean.findings == [], [f.message for f in clean.findings]


def test_every_rule_has_a_broken_system_in_this_file() -> None:
    tested = {name[len("test_") :].split("__")[0].replace("_", "-") for name in globals() if name.startswith("test_")}
    assert set(RULES) <= tested, f"rules without a test here: {sorted(set(RULES) - tested)}"


# ---- unconsumed-event ------------------------------------------------------------------------


def test_unconsumed_event__names_the_emitter_and_where(clean) -> None:
    orders = Service("orders")

    @orders.command(PlaceOrder, emits=[OrderPlaced])
    def place(cmd, ctx): ...

    f = only(analysis_of(orders), "unconsumed-event")
    assert f.severity == "warning"
    assert f.message == "event OrderPlaced is emitted by orders.place but no service consumes it"
    assert (f.services, f.messages) == (("orders",), ("OrderPlaced",))
    handler = location(f, "orders.place")
    assert (handler.module, handler.line) == (__name__, place.__code__.co_firstlineno)
    assert source_line(handler).startswith("@orders.command(PlaceOrder")
    assert source_line(location(f, "event OrderPlaced")).startswith("class OrderPlaced(")
    assert not findings(clean, "unconsumed-event")


def test_unconsumed_event__emitted_outside_handlers_too() -> None:
    clock = Service("clock", emits=[OrderPlaced])
    f = only(analysis_of(clock), "unconsumed-event")
    assert f.message == "event OrderPlaced is emitted by service clock but no service consumes it"
    assert source_line(location(f, "service clock")).startswith('clock = Service("clock"')


# ---- unfed-subscription ----------------------------------------------------------------------


def test_unfed_subscription__names_the_subscriber(clean) -> None:
    mail = Service("mail")

    @mail.on(Welcome)
    def send_welcome(event): ...

    f = only(analysis_of(mail), "unfed-subscription")
    assert f.severity == "warning"
    assert f.message == "mail.send_welcome subscribes to event Welcome, which no service emits"
    assert source_line(location(f, "mail.send_welcome")).startswith("@mail.on(Welcome)")
    assert not findings(clean, "unfed-subscription")


def test_unfed_subscription__a_service_level_emit_feeds_it() -> None:
    mail = Service("mail")
    signup = Service("signup", emits=[Welcome])

    @mail.on(Welcome)
    def send_welcome(event): ...

    assert not findings(analysis_of(mail, signup), "unfed-subscription")


# ---- no-owner --------------------------------------------------------------------------------


def test_no_owner__a_command_sent_that_nobody_handles(clean) -> None:
    orders = Service("orders")

    @orders.command(PlaceOrder, sends=[ChargeCard])
    def place(cmd, ctx): ...

    f = only(analysis_of(orders), "no-owner")
    assert f.severity == "error"
    assert f.message == "command ChargeCard has no owner: sent by orders.place"
    assert source_line(location(f, "orders.place")).startswith("@orders.command(PlaceOrder, sends=[ChargeCard])")
    assert source_line(location(f, "command ChargeCard")).startswith("class ChargeCard(")
    assert not findings(clean, "no-owner")


def test_no_owner__a_query_asked_that_nobody_answers() -> None:
    web = Service("web", sends=[GetOrder])
    f = only(analysis_of(web), "no-owner")
    assert f.message == "query GetOrder has no owner: asked by service web"


# ---- several-owners --------------------------------------------------------------------------


def test_several_owners__names_both_owners(clean) -> None:
    payments, billing = Service("payments"), Service("billing")

    @payments.command(ChargeCard)
    def charge(cmd): ...

    @billing.command(ChargeCard)
    def charge_again(cmd): ...

    f = only(analysis_of(payments, billing), "several-owners")
    assert f.severity == "error"
    assert f.message == "command ChargeCard has two owners: payments, billing"
    assert source_line(location(f, "payments.charge")).startswith("@payments.command(ChargeCard)")
    assert source_line(location(f, "billing.charge_again")).startswith("@billing.command(ChargeCard)")
    assert not findings(clean, "several-owners")


# ---- cycle -----------------------------------------------------------------------------------


def test_cycle__named_in_full_with_every_handler(clean) -> None:
    orders, payments = Service("orders"), Service("payments")

    @orders.on(PaymentFailed, sends=[RetryPayment])
    def payment_failed(event, ctx): ...

    @payments.command(RetryPayment, emits=[PaymentFailed])
    def retry(cmd, ctx): ...

    f = only(analysis_of(payments, orders), "cycle")
    assert f.severity == "warning"
    assert f.message == "cycle: orders -> payments -> orders via PaymentFailed, RetryPayment"
    assert f.services == ("orders", "payments")
    assert "orders.payment_failed sends RetryPayment; payments.retry emits PaymentFailed" in f.hint
    assert source_line(location(f, "orders.payment_failed")).startswith("@orders.on(PaymentFailed")
    assert source_line(location(f, "payments.retry")).startswith("@payments.command(RetryPayment")
    assert not findings(clean, "cycle")


def test_cycle__a_handler_feeding_itself() -> None:
    orders = Service("orders")

    @orders.on(OrderUpdated, emits=[OrderUpdated])
    def on_updated(event, ctx): ...

    assert only(analysis_of(orders), "cycle").message == "cycle: orders -> orders via OrderUpdated"


def test_cycle__is_between_handlers_not_services() -> None:
    # orders handles PlaceOrder and, in *another* handler, PaymentFailed: orders -> payments -> orders
    # at the service level, but no handler's output ever comes back to it.
    orders, payments = Service("orders"), Service("payments")

    @orders.command(PlaceOrder, sends=[ChargeCard])
    def place(cmd, ctx): ...

    @payments.command(ChargeCard, emits=[PaymentFailed])
    def charge(cmd, ctx): ...

    @orders.on(PaymentFailed)
    def failed(event): ...

    assert not findings(analysis_of(orders, payments), "cycle")


# ---- query-side-effects ----------------------------------------------------------------------


def test_query_side_effects__names_the_query_handler(clean) -> None:
    orders, audit = Service("orders"), Service("audit")

    @orders.query(GetOrder, emits=[OrderPlaced], sends=[ChargeCard])
    def get_order(query): ...

    @audit.on(OrderPlaced)
    def seen(event): ...

    @audit.command(ChargeCard)
    def charge(cmd): ...

    f = only(analysis_of(orders, audit), "query-side-effects")
    assert f.severity == "error"
    assert f.message == "query handler orders.get_order for GetOrder declares emits OrderPlaced and sends ChargeCard"
    assert source_line(location(f, "orders.get_order")).startswith("@orders.query(GetOrder")
    assert not findings(clean, "query-side-effects")


# ---- missing-key-field -----------------------------------------------------------------------


def test_missing_key_field__a_keyed_subscription(clean) -> None:
    mail, signup = Service("mail"), Service("signup", emits=[Welcome])

    @mail.on(Welcome, key="account_id")
    def send_welcome(event): ...

    f = only(analysis_of(mail, signup), "missing-key-field")
    assert f.severity == "error"
    assert f.message == "mail.send_welcome is keyed by 'account_id', a field Welcome lacks (fields: user_id)"
    assert source_line(location(f, "mail.send_welcome")).startswith('@mail.on(Welcome, key="account_id")')
    assert not findings(clean, "missing-key-field")


def test_missing_key_field__a_type_keyed_by_a_field_it_lacks_in_a_json_spec() -> None:
    # The class API refuses this at class creation; a spec from JSON or another codebase may still carry it.
    bad = MessageSpec("Welcome", "event", (FieldSpec("user_id", "str", True),), key="account_id", module="m", line=3)
    spec = SystemSpec(services=(ServiceSpec("signup", emits=("Welcome",), messages=(bad,)),), messages={"Welcome": bad})
    f = only(analyze(spec), "missing-key-field")
    assert f.message == "event Welcome is keyed by 'account_id', a field it lacks (fields: user_id)"
    assert [str(loc) for loc in f.locations] == ["event Welcome at m:3"]


# ---- unordered-producers ---------------------------------------------------------------------


def test_unordered_producers__a_keyed_type_from_two_services(clean) -> None:
    orders, admin, search = Service("orders"), Service("admin", emits=[OrderUpdated]), Service("search")

    @orders.command(PlaceOrder, emits=[OrderUpdated])
    def place(cmd, ctx): ...

    @search.on(OrderUpdated)
    def index(event): ...

    f = only(analysis_of(orders, admin, search), "unordered-producers")
    assert f.severity == "warning"
    assert f.message.startswith(
        "search.index consumes OrderUpdated keyed by order_id from two services (orders, admin)"
    )
    assert source_line(location(f, "search.index")).startswith("@search.on(OrderUpdated)")
    assert source_line(location(f, "orders.place")).startswith("@orders.command(PlaceOrder")
    assert source_line(location(f, "service admin")).startswith('orders, admin, search = Service("orders")')
    assert not findings(clean, "unordered-producers")


def test_unordered_producers__not_for_one_service_with_two_handlers() -> None:
    orders, search = Service("orders"), Service("search")

    @orders.command(PlaceOrder, emits=[OrderUpdated])
    def place(cmd, ctx): ...

    @orders.on(PaymentFailed, emits=[OrderUpdated])
    def failed(event, ctx): ...

    @search.on(OrderUpdated)
    def index(event): ...

    assert not findings(analysis_of(orders, search), "unordered-producers")


def test_unordered_producers__not_for_an_unkeyed_subscription() -> None:
    a, b, mail = Service("a", emits=[Welcome]), Service("b", emits=[Welcome]), Service("mail")

    @mail.on(Welcome)  # Welcome has no key: there is no order to lose
    def send(event): ...

    assert not findings(analysis_of(a, b, mail), "unordered-producers")


# ---- unknown-type and type-conflict (specs from JSON or a mesh) ------------------------------


def test_unknown_type__used_but_declared_nowhere(clean) -> None:
    spec = SystemSpec(
        services=(
            ServiceSpec(
                "orders",
                handlers=(
                    HandlerSpec("place", "command", "PlaceOrder", emits=("OrderPlaced",), module="shop.orders", line=9),
                ),
            ),
        )
    )
    found = findings(analyze(spec), "unknown-type")
    assert [f.message for f in found] == [
        "OrderPlaced is used by orders.place but declared nowhere in the system",
        "PlaceOrder is used by orders.place but declared nowhere in the system",
    ]
    assert all(f.severity == "error" for f in found)
    assert str(found[0].locations[0]) == "orders.place at shop.orders:9"
    assert not findings(clean, "unknown-type")


def _welcome(fields: tuple[FieldSpec, ...], kind: str = "event", module: str = "") -> MessageSpec:
    return MessageSpec("Welcome", kind, fields, module=module, line=1)  # type: ignore[arg-type]


def test_type_conflict__two_services_disagree_on_the_fields(clean) -> None:
    mine = _welcome((FieldSpec("user_id", "str", True, {"type": "string"}),), module="signup.types")
    theirs = _welcome((FieldSpec("user_id", "int", True, {"type": "integer"}),), module="mail.types")
    spec = system_spec(
        [
            ServiceSpec("signup", emits=("Welcome",), messages=(mine,), module="signup", line=4),
            ServiceSpec(
                "mail", handlers=(HandlerSpec("send", "event", "Welcome"),), messages=(theirs,), module="mail", line=7
            ),
        ]
    )
    f = only(analyze(spec), "type-conflict")
    assert f.severity == "warning"
    assert f.message == "Welcome is declared differently by signup / mail: fields differ"
    assert [str(loc) for loc in f.locations] == ["service signup at signup:4", "service mail at mail:7"]
    assert not findings(clean, "type-conflict")


def test_type_conflict__same_shape_declared_in_two_codebases_is_fine() -> None:
    fields = (FieldSpec("user_id", "str", True, {"type": "string"}),)
    spec = system_spec(
        [
            ServiceSpec("signup", emits=("Welcome",), messages=(_welcome(fields, module="signup.types"),)),
            ServiceSpec(
                "mail",
                handlers=(HandlerSpec("send", "event", "Welcome"),),
                messages=(_welcome(fields, module="mail.types"),),
            ),
        ]
    )
    assert analyze(spec).findings == []


def test_type_conflict__a_different_kind_is_an_error() -> None:
    fields = (FieldSpec("user_id", "str", True, {"type": "string"}),)
    spec = system_spec(
        [
            ServiceSpec("signup", emits=("Welcome",), messages=(_welcome(fields),)),
            ServiceSpec(
                "mail",
                handlers=(HandlerSpec("send", "command", "Welcome"),),
                messages=(_welcome(fields, kind="command"),),
            ),
        ]
    )
    f = only(analyze(spec), "type-conflict")
    assert f.severity == "error" and "kind" in f.message


# ---- ordering and selection ------------------------------------------------------------------


def test_errors_come_first_and_ignore_drops_rules() -> None:
    from analyzer_systems import broken  # noqa: F401  (imported for its services)

    a = analyze(system_spec(collect_services("analyzer_systems.broken")))
    severities = [f.severity for f in a.findings]
    assert severities == sorted(severities, key=["error", "warning"].index)
    assert {f.code for f in a.findings} >= {"no-owner", "several-owners", "cycle", "query-side-effects"}
    kept = lint(a.graph, ignore=["cycle", "no-owner"])
    assert {f.code for f in kept} == {f.code for f in a.findings} - {"cycle", "no-owner"}
    with pytest.raises(ChoreoUsageError, match="unknown rule"):
        lint(a.graph, ignore=["no-such-rule"])
