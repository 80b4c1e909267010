"""Renderers: DOT that Graphviz draws, SVG/PNG, Mermaid, self-contained HTML, text; findings highlighted."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # tests/, so analyzer_systems imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from choreo.analyzer import FORMATS, GraphvizMissing, _dot, analyze, render
from choreo.analyzer._formats import format_for_path
from choreo.analyzer._load import collect_services
from choreo.analyzer._text import Style
from choreo.spec import system_spec

needs_graphviz = pytest.mark.skipif(
    shutil.which("dot") is None,
    reason="Graphviz 'dot' is not installed: 'make test' installs it where it can (apt-get install graphviz)",
)


@pytest.fixture(scope="module")
def shop():
    return analyze(system_spec(collect_services("analyzer_systems.shop")), name="shop")


@pytest.fixture(scope="module")
def broken():
    return analyze(system_spec(collect_services("analyzer_systems.broken")), name="broken")


def _dot_node(dot: str, node: str) -> str:
    match = re.search(rf'^  "{re.escape(node)}" \[(.*)\];$', dot, re.M)
    assert match, f"node {node} not in the DOT output"
    return match.group(1)


def _dot_edges(dot: str, u: str, v: str) -> list[str]:
    return re.findall(rf'^  "{re.escape(u)}" -> "{re.escape(v)}" \[(.*)\];$', dot, re.M)


def test_dot_draws_each_kind_distinctly(shop) -> None:
    dot = render(shop, "dot", queries="draw")
    assert 'rankdir="TB"' in dot, "flows read top to bottom, by stage"
    assert 'shape="box"' in _dot_node(dot, "service:orders")
    assert 'shape="ellipse"' in _dot_node(dot, "message:OrderPlaced")
    assert 'shape="cds"' in _dot_node(dot, "message:PlaceOrder")
    assert 'shape="hexagon"' in _dot_node(dot, "message:GetOrder")
    assert 'peripheries="2"' in _dot_node(dot, "message:PlaceOrder")  # an entry point
    assert "peripheries" not in _dot_node(dot, "message:OrderPlaced")
    (ask,) = _dot_edges(dot, "service:storefront", "message:GetOrder")
    assert 'style="dashed"' in ask
    (send,) = _dot_edges(dot, "service:storefront", "message:PlaceOrder")
    assert 'style="bold"' in send
    # two handlers of orders emit OrderCancelled: one line drawn, both named in its tooltip
    (emit,) = _dot_edges(dot, "service:orders", "message:OrderCancelled")
    assert "orders.payment_failed emits OrderCancelled" in emit and "orders.refunded emits OrderCancelled" in emit
    assert "#c53030" not in dot  # a clean system has nothing red, not even in its legend


def test_queries_are_folded_into_the_services_that_answer_and_ask_them(shop, broken) -> None:
    dot = render(shop, "dot")
    assert '"message:GetOrder"' not in dot and 'shape="hexagon"' not in dot
    assert not _dot_edges(dot, "service:storefront", "message:GetOrder")
    assert "answers GetOrder" in _dot_node(dot, "service:orders")
    assert "asks GetOrder" in _dot_node(dot, "service:storefront")
    # a query a finding names is drawn all the same, so the culprit can be seen
    assert "<B>orders</B>" in _dot_node(render(broken, "dot"), "service:orders")
    assert 'shape="hexagon"' in _dot_node(render(broken, "dot"), "message:GetOrder")
    with pytest.raises(ValueError, match="queries must be one of fold, draw"):
        render(shop, "dot", queries="hide")


def _legend(dot: str) -> str:
    return _dot_node(dot, "legend")


def test_the_legend_explains_exactly_what_is_drawn(shop, broken) -> None:
    folded, drawn = _legend(render(shop, "dot")), _legend(render(shop, "dot", queries="draw"))
    for text in ("double border: an entry point", "bold arrow: a service sends a command", "black dot: outside the system"):
        assert text in folded and text in drawn
    assert "answers / asks" in folded and "answers / asks" not in drawn
    assert "dashed arrow: a service asks a query" in drawn and "dashed arrow: a service asks a query" not in folded
    assert ">query<" in drawn and ">query<" not in folded
    assert "edge label: keyed by another field" in folded  # notifications takes OrderShipped broadcast
    assert "outline" not in folded, "no error or warning boxes without findings"
    bad = _legend(render(broken, "dot"))
    assert "red outline: involved in an error-level finding" in bad and "orange outline: involved in a warning" in bad
    # and nothing the drawing does not use: a system with one plain event flow
    from choreo.spec import HandlerSpec, ServiceSpec, SystemSpec

    plain = analyze(SystemSpec(services=(ServiceSpec("a", emits=("Go",)), ServiceSpec("b", handlers=(HandlerSpec("h", "event", "Go"),)))), ignore=["unknown-type"])
    legend = _legend(render(plain, "dot"))
    rows = re.findall(r'<TD ALIGN="LEFT" COLSPAN="\d">([^<]*)</TD>', legend)
    assert rows == ["double border: an entry point (a flow starts there)",
                    "arrow: a service emits an event; a message goes to the service that handles it"], rows
    assert ">event<" in legend and ">command<" not in legend


@needs_graphviz
def test_the_shop_fits_a_readme_at_its_natural_size() -> None:
    from choreo.analyzer import load_spec

    svg = render(analyze(*load_spec("examples.shop")), "svg")
    width_pt = float(re.search(r'<svg width="([\d.]+)pt"', svg).group(1))
    assert width_pt * 4 / 3 <= 900, f"{width_pt * 4 / 3:.0f} px wide: shrunk to fit a README, its text gets small"
    sizes = [float(x) for x in re.findall(r'font-size="([\d.]+)"', svg)]
    assert min(sizes) * 4 / 3 >= 12, "the smallest text is 12 px at natural size"


def test_dot_highlights_findings(broken) -> None:
    dot = render(broken, "dot")
    red, orange = _dot.SEVERITY_COLOUR["error"], _dot.SEVERITY_COLOUR["warning"]
    charge = _dot_node(dot, "message:ChargeCard")  # two owners: an error
    assert f'color="{red}"' in charge and "error: command ChargeCard has two owners: payments, billing" in charge
    (edge,) = _dot_edges(dot, "message:ChargeCard", "service:billing")
    assert f'color="{red}"' in edge
    (loop,) = _dot_edges(dot, "message:RetryPayment", "service:payments")  # the cycle: a warning
    assert f'color="{orange}"' in loop and "warning: cycle: orders -> payments -> orders" in loop
    (plain,) = _dot_edges(dot, "message:PlaceOrder", "service:orders")
    assert "color=" not in plain


def test_dot_quotes_awkward_names() -> None:
    from choreo.spec import HandlerSpec, ServiceSpec, SystemSpec

    spec = SystemSpec(services=(ServiceSpec('we"ird\\svc', handlers=(HandlerSpec("h", "event", 'Odd"Name<&>'),)),))
    dot = render(analyze(spec), "dot")
    assert '"service:we\\"ird\\\\svc"' in dot
    assert "Odd&quot;Name&lt;&amp;&gt;" in dot  # in the HTML-like label
    if shutil.which("dot"):
        subprocess.run(["dot", "-Tsvg"], input=dot.encode(), check=True, capture_output=True, timeout=60)


@needs_graphviz
@pytest.mark.parametrize("system", ["shop", "broken"])
def test_dot_renders_with_graphviz(system, request) -> None:
    analysis = request.getfixturevalue(system)
    done = subprocess.run(["dot", "-Tsvg"], input=render(analysis, "dot").encode(), capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b"", done.stderr.decode()  # no warnings either
    svg = done.stdout.decode()
    folded = {n for n, d in analysis.graph.nodes(data=True) if d["kind"] == "query" and not analysis.node_notes.get(n)}
    for node in analysis.graph.nodes:
        assert (f'id="{node}"' in svg) == (node not in folded or system == "broken"), node


@needs_graphviz
def test_svg_and_png(shop) -> None:
    svg = render(shop, "svg")
    assert isinstance(svg, str) and "<svg" in svg and 'id="service:orders"' in svg
    png = render(shop, "png")
    assert isinstance(png, bytes) and png.startswith(b"\x89PNG\r\n\x1a\n")


def test_without_graphviz_the_error_says_how_to_install_it(shop, monkeypatch) -> None:
    monkeypatch.setattr(_dot.shutil, "which", lambda name: None)
    for fmt in ("svg", "png", "html"):
        with pytest.raises(GraphvizMissing, match="apt-get install graphviz.*brew install graphviz"):
            render(shop, fmt)
    assert render(shop, "dot").startswith("digraph")  # DOT itself needs nothing


def test_mermaid(shop, broken) -> None:
    text = render(shop, "mermaid")
    lines = text.splitlines()
    assert lines[0] == "flowchart LR"
    assert '  s_orders("orders"):::service' in lines
    assert '  m_OrderPlaced(["OrderPlaced"]):::event' in lines
    assert '  m_PlaceOrder[/"PlaceOrder"/]:::command' in lines
    assert '  m_GetOrder{{"GetOrder"}}:::query' in lines
    assert "  s_storefront ==> m_PlaceOrder" in lines
    assert "  s_storefront -.-> m_GetOrder" in lines
    assert "  outside -.-> m_RefundPayment" in lines
    assert '  m_OrderShipped -->|"broadcast"| s_notifications' in lines
    assert lines.count("  s_orders --> m_OrderCancelled") == 1
    assert not any(line.startswith("  linkStyle") for line in lines)
    bad = render(broken, "mermaid").splitlines()
    (err,) = [line for line in bad if line.startswith("  class ") and line.endswith(" error")]
    assert "m_ChargeCard" in err.split()[1].split(",")
    links = [line for line in bad if " --> " in line or " ==> " in line or " -.-> " in line or "-->|" in line]
    (red,) = [line for line in bad if line.startswith("  linkStyle") and "#c53030" in line]
    red_links = {links[int(i)].strip() for i in red.split()[1].split(",")}
    assert "m_ChargeCard --> s_billing" in red_links


def test_mermaid_ids_are_safe_and_unique() -> None:
    from choreo.spec import HandlerSpec, ServiceSpec, SystemSpec

    handlers = (HandlerSpec("h", "event", "x.y"), HandlerSpec("g", "event", "x_y"))
    spec = SystemSpec(services=(ServiceSpec("a-b", handlers=handlers),))
    lines = render(analyze(spec), "mermaid").splitlines()
    ids = [line.split("(", 1)[0].strip() for line in lines[1:] if ":::" in line]
    assert sorted(ids) == ["m_x_y", "m_x_y_2", "outside", "s_a_b"]
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", i) for i in ids)


@needs_graphviz
def test_html_is_one_self_contained_page(broken) -> None:
    page = render(broken, "html")
    assert isinstance(page, str) and page.startswith("<!doctype html>")
    assert "<svg" in page and "<?xml" not in page and "<!DOCTYPE svg" not in page
    assert "command ChargeCard has two owners: payments, billing" in page
    assert page.count("<tr class='error'>") == len(broken.errors)
    assert page.count("<tr class='warning'>") == len(broken.warnings)
    # nothing fetched from anywhere: scripts and styles inline, no images, no remote links, no polling
    assert not re.search(r"<script[^>]*src=|<link|<img|@import|url\(|(src|href)=[\"']?https?:", page, re.I)
    assert '"live":null' in page


def test_text_has_the_flow_tree_and_the_findings(broken) -> None:
    text = render(broken, "text")
    assert text.startswith("broken: 3 services, 8 message types (4 commands, 3 events, 1 query), 2 entry points\n")
    assert "PlaceOrder (command, from outside): depth 4" in text
    assert "└─ orders.place  analyzer_systems.broken:" in text
    assert "sends Refund (command)  no owner" in text
    assert re.search(r"^error     several-owners +command ChargeCard has two owners: payments, billing$", text, re.M)
    assert "4 errors, 3 warnings" in text
    assert "\x1b[" not in text
    assert "\x1b[1;31m" in render(broken, "text", Style(color=True))


def test_formats_table_and_suffixes() -> None:
    assert list(FORMATS) == ["text", "dot", "svg", "png", "mermaid", "json", "asyncapi", "html"]
    assert [format_for_path(p) for p in ("a.svg", "a.PNG", "a.gv", "a.mmd", "a.json", "a.html", "a.xyz")] == [
        "svg",
        "png",
        "dot",
        "mermaid",
        "json",
        "html",
        None,
    ]


def test_names_that_look_like_markup_stay_text() -> None:
    from choreo.spec import HandlerSpec, ServiceSpec, SystemSpec

    spec = SystemSpec(services=(ServiceSpec("svc", handlers=(HandlerSpec("<h>", "event", "<Tag>#1"),)),))
    analysis = analyze(spec)
    dot = render(analysis, "dot")
    assert "label=<&lt;Tag&gt;#1>" in dot  # escaped inside the HTML-like label
    assert 'tooltip="svc.<h> handles <Tag>#1\\n' in dot  # a plain quoted string, not markup
    assert '(["#35;lt;Tag>#35;1"])' not in render(analysis, "mermaid")
    assert '(["<Tag>#35;1"]):::event' in render(analysis, "mermaid")
    if shutil.which("dot"):
        done = subprocess.run(["dot", "-Tsvg"], input=dot.encode(), capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr.decode()


def test_what_a_service_sends_outside_handlers_is_named_once_in_parentheses(shop) -> None:
    import dataclasses

    from choreo.analyzer._observed import compare, observe

    obs = observe([], shop.graph)
    text = render(dataclasses.replace(shop, observed=compare(shop.graph, obs), observation=obs), "text")
    line = next(line for line in text.splitlines() if "storefront --sends--> PlaceOrder" in line)
    assert line.endswith("storefront --sends--> PlaceOrder  (outside handlers)"), line
    assert "((" not in text
    assert "storefront (outside handlers) sends PlaceOrder" in render(shop, "dot")
