"""The flow graph: what it holds, and that its JSON form round-trips to the same graph and spec."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import networkx as nx
import pytest

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # tests/, so analyzer_systems imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from choreo import Event, Service
from choreo.analyzer import analyze, build_graph, from_node_link, graph_to_spec, render, to_node_link
from choreo.analyzer._load import collect_services, load_spec
from choreo.errors import ChoreoUsageError
from choreo.spec import FieldSpec, HandlerSpec, MessageSpec, ServiceSpec, SystemSpec, system_spec


@pytest.fixture(scope="module")
def shop_spec() -> SystemSpec:
    return system_spec(collect_services("analyzer_systems.shop"))


def test_nodes_are_services_and_message_types_of_each_kind(shop_spec) -> None:
    g = build_graph(shop_spec, name="shop")
    kinds = {n: d["kind"] for n, d in g.nodes(data=True)}
    assert {n for n, k in kinds.items() if k == "service"} == {
        "service:orders",
        "service:payments",
        "service:shipping",
        "service:notifications",
        "service:storefront",
    }
    assert {n for n, k in kinds.items() if k == "command"} == {"message:PlaceOrder", "message:RefundPayment"}
    assert {n for n, k in kinds.items() if k == "query"} == {"message:GetOrder"}
    assert len([k for k in kinds.values() if k == "event"]) == 6
    assert g.graph["name"] == "shop"


def test_edges_carry_the_declarations(shop_spec) -> None:
    g = build_graph(shop_spec)
    handles = g.edges["message:OrderPlaced", "service:payments", "handles"]
    assert handles["handler"] == "charge"
    assert handles["key_field"] == "order_id"
    assert handles["emits"] == ["PaymentCaptured", "PaymentFailed"]
    assert handles["module"] == "analyzer_systems.shop.payments"
    # a handler's emit: one edge per (handler, type), keyed by the type the handler handles
    emit = g.edges["service:payments", "message:PaymentFailed", "emits@OrderPlaced"]
    assert (emit["relation"], emit["handler"], emit["handles"]) == ("emits", "charge", "OrderPlaced")
    # the service that sends outside handlers: handler None
    send = g.edges["service:storefront", "message:PlaceOrder", "sends@(service)"]
    assert send["handler"] is None and send["relation"] == "sends"
    # two handlers of one service emitting one type: two parallel edges (a multigraph)
    assert set(g["service:orders"]["message:OrderCancelled"]) == {"emits@PaymentFailed", "emits@PaymentRefunded"}
    broadcast = g.edges["message:OrderShipped", "service:notifications", "handles"]
    assert broadcast["broadcast"] is True


def test_the_graph_holds_json_data_only(shop_spec) -> None:
    # tuples would come back from JSON as lists and the graphs would differ
    def plain(value: object) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (str, int, float, bool))

    g = build_graph(shop_spec)
    assert plain(g.graph)
    assert all(plain(d) for _, d in g.nodes(data=True))
    assert all(plain(d) for _, _, d in g.edges(data=True))


def test_json_round_trips_to_the_same_graph_and_spec(shop_spec) -> None:
    g = build_graph(shop_spec, name="shop")
    text = render(analyze(shop_spec, name="shop"), "json")
    back = from_node_link(json.loads(text))
    assert nx.utils.graphs_equal(g, back)
    assert list(back.nodes) == list(g.nodes)
    assert list(back.edges(keys=True)) == list(g.edges(keys=True))
    assert graph_to_spec(back) == shop_spec
    assert SystemSpec.from_json(graph_to_spec(back).to_json()) == shop_spec


def test_networkx_reads_the_node_link_json_too(shop_spec) -> None:
    g = build_graph(shop_spec)
    data = json.loads(json.dumps(to_node_link(g)))
    try:
        back = nx.node_link_graph(data, edges="edges")
    except TypeError:  # networkx < 3.4 has no edges= argument
        pytest.skip(f"networkx {nx.__version__} reads node-link edges only under 'links'")
    assert nx.utils.graphs_equal(g, back)


def test_a_spec_from_another_codebase_round_trips_exactly() -> None:
    # Per-service declarations that differ from the system's, a type declared nowhere, a type
    # nobody mentions: all of it survives graph -> JSON -> graph -> spec.
    ours = MessageSpec("Welcome", "event", (FieldSpec("user_id", "str", True, {"type": "string"}),), module="a", line=1)
    theirs = MessageSpec("Welcome", "event", (FieldSpec("uid", "int", True, {"type": "integer"}),), module="b", line=2)
    lonely = MessageSpec("Unused", "command", (), doc="nobody mentions me")
    spec = SystemSpec(
        services=(
            ServiceSpec(
                "signup", emits=("Welcome",), messages=(ours,), partitions=8, doc="signs up", module="a", line=5
            ),
            ServiceSpec(
                "mail",
                handlers=(
                    HandlerSpec("send", "event", "Welcome", key="uid", broadcast=True, retries=7, module="b", line=9),
                    HandlerSpec("other", "command", "Ghost", sends=("Phantom",)),
                ),
                messages=(theirs,),
            ),
        ),
        messages={"Welcome": ours, "Unused": lonely},
    )
    g = build_graph(spec)
    back = from_node_link(json.loads(json.dumps(to_node_link(g))))
    assert nx.utils.graphs_equal(g, back)
    assert graph_to_spec(back) == spec


def test_loading_the_json_file_gives_the_spec_back(shop_spec, tmp_path) -> None:
    path = tmp_path / "shop.json"
    path.write_text(render(analyze(shop_spec, name="shop"), "json"))
    spec, name = load_spec(str(path))
    assert (spec, name) == (shop_spec, "shop")
    bare = tmp_path / "bare.json"
    bare.write_bytes(shop_spec.to_json())
    assert load_spec(str(bare)) == (shop_spec, "bare")


def test_two_services_with_one_name_are_refused_with_both_places() -> None:
    spec = SystemSpec(services=(ServiceSpec("orders", module="a", line=3), ServiceSpec("orders", module="b", line=4)))
    with pytest.raises(ChoreoUsageError, match=r"two services are named 'orders': declared at a:3 and b:4"):
        build_graph(spec)


def test_graph_to_spec_refuses_a_graph_it_did_not_build() -> None:
    with pytest.raises(ChoreoUsageError, match="not a choreo flow graph"):
        graph_to_spec(nx.MultiDiGraph())
    with pytest.raises(ChoreoUsageError, match="--format json"):
        from_node_link({"graph": {}, "nodes": [], "edges": []})


class Pinged(Event):
    n: int


def test_service_objects_and_specs_give_the_same_graph() -> None:
    monitor = Service("monitor", emits=[Pinged])
    a = build_graph(system_spec([monitor]))
    b = build_graph(system_spec([monitor.spec()]))
    assert nx.utils.graphs_equal(a, b)
