"""The flow graph as people see it, in a real headless browser (Chromium) at 900 px.

The HTML page of ``choreo graph`` is opened from disk (it must work offline), screenshotted, and
used the way a person would: the drawing at its natural size with legible text, a click on a
service lights up the paths through it, the wheel zooms, a drag pans, the search box finds a
name, a finding's link goes to what it names, and the page logs no error. The README's image
(docs/shop.svg) is measured at a README's width too. Tests skip, with the reason, where Chromium
or Graphviz is missing (``make tools`` installs both where it can).
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

from browser import Browser, chromium_unavailable
from choreo.cli import main

ROOT = Path(__file__).resolve().parents[2]
WIDTH = 900
LEGIBLE_PX = 11  # the smallest text, as drawn on the screen

pytestmark = [
    pytest.mark.skipif(chromium_unavailable() is not None, reason=str(chromium_unavailable())),
    pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' is not installed (apt-get install graphviz)"),
]

# the size, on screen, of every piece of text of the drawing (SVG font size x the transform)
TEXT_SIZES = """Array.from(document.querySelectorAll('#viewport svg text')).map(t => {
  const m = t.getScreenCTM(); return parseFloat(getComputedStyle(t).fontSize) * Math.hypot(m.a, m.b); })"""


def _page(tmp_path: Path, target: str, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    out = tmp_path / f"{target.rsplit('.', 1)[-1]}.html"
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    assert main(["graph", target, "-o", str(out), *args]) == 0, capsys.readouterr().err
    return out.as_uri()


def _node(page: Browser, node: str) -> tuple[float, float]:
    return page.center_of(f'[id="{node}"]')


def _dimmed(page: Browser) -> set[str]:
    return set(page.evaluate("Array.from(document.querySelectorAll('g.node.dim')).map(g => g.id)"))


def test_the_shop_page_reads_at_900_px_and_answers_clicks_wheel_drag_and_search(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    url = _page(tmp_path, "examples.shop", capsys)
    with Browser(width=WIDTH, height=1400) as page:  # tall enough to show payments without panning
        page.open(url)
        page.screenshot(tmp_path / "shop-page.png")
        assert (tmp_path / "shop-page.png").stat().st_size > 10_000
        # natural size, all of its width on screen, every text legible
        assert page.evaluate("window.choreoGraph.view.k") == 1
        drawing, port = page.evaluate(
            "[document.querySelector('#viewport svg').getBoundingClientRect().width, "
            "document.getElementById('viewport').clientWidth]"
        )
        assert drawing <= port, f"the drawing is {drawing:.0f} px wide in a {port} px viewport"
        sizes = page.evaluate(TEXT_SIZES)
        assert sizes and min(sizes) >= LEGIBLE_PX, f"smallest text {min(sizes):.1f} px"

        # a click on payments: what reaches it and what its handlers set in motion stay lit
        page.click(*_node(page, "service:payments"))
        assert page.evaluate("document.querySelector('[id=\"service:payments\"]').classList.contains('selected')")
        dim = _dimmed(page)
        lit = {"message:PlaceOrder", "service:api", "service:inventory", "message:StockReserved", "service:shipping",
               "message:PaymentDeclined", "service:notifications"}  # fmt: skip
        assert not dim & lit, f"on the paths through payments, yet dimmed: {sorted(dim & lit)}"
        assert "message:OutOfStock" in dim, "inventory's other outcome does not go through payments"
        details = page.evaluate("document.getElementById('details').innerText")
        assert "payments" in details and "charge: StockReserved -> PaymentCaptured, PaymentDeclined" in details
        assert "PlaceOrder (from mobile)" in details
        # a click on the empty canvas clears it
        page.click(20, page.center_of("#viewport")[1] + 300)
        assert _dimmed(page) == set()

        # the wheel zooms in around the pointer; a drag moves the drawing by as much
        x, y = page.center_of("#viewport")
        page.wheel(x, y, -240)
        assert page.evaluate("window.choreoGraph.view.k") > 1
        before = page.evaluate("[window.choreoGraph.view.x, window.choreoGraph.view.y]")
        page.drag(x, y, -120, -80)
        after = page.evaluate("[window.choreoGraph.view.x, window.choreoGraph.view.y]")
        assert (round(after[0] - before[0]), round(after[1] - before[1])) == (-120, -80)
        page.click(*page.center_of("#fit"))
        assert page.evaluate("window.choreoGraph.view.k") <= 1
        page.click(*page.center_of("#actual"))
        assert page.evaluate("window.choreoGraph.view.k") == 1

        # search: every name that contains the text; Enter goes to the first
        page.click(*page.center_of("#search"))
        page.type_text("pay")
        assert page.evaluate("document.getElementById('status').textContent") == "3 matches"
        matched = set(page.evaluate("Array.from(document.querySelectorAll('g.node.match')).map(g => g.id)"))
        assert matched == {"service:payments", "message:PaymentCaptured", "message:PaymentDeclined"}
        page.press("Enter", 13)
        assert page.evaluate("document.querySelector('g.node.selected').id") in matched
        page.screenshot(tmp_path / "shop-page-selected.png")
        assert page.errors == [], page.errors


def test_a_finding_links_to_what_it_names(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    url = _page(tmp_path, "analyzer_systems.broken", capsys)
    with Browser(width=WIDTH, height=900) as page:
        page.open(url)
        links = page.evaluate("Array.from(document.querySelectorAll('a.culprit')).map(a => a.dataset.node)")
        assert "message:ChargeCard" in links and "service:billing" in links
        page.evaluate("document.querySelector('a.culprit[data-node=\"message:ChargeCard\"]').scrollIntoView({block: 'center'})")
        page.click(*page.center_of('a.culprit[data-node="message:ChargeCard"]'))
        assert page.evaluate("document.querySelector('g.node.selected').id") == "message:ChargeCard"
        details = page.evaluate("document.getElementById('details').innerText")
        assert "command ChargeCard has two owners: payments, billing" in details
        # it was brought into view: the selected node is inside the viewport now
        inside = page.evaluate(
            "(() => { const n = document.querySelector('g.node.selected').getBoundingClientRect();"
            " const v = document.getElementById('viewport').getBoundingClientRect();"
            " return n.left >= v.left && n.right <= v.right && n.top >= v.top && n.bottom <= v.bottom; })()"
        )
        assert inside
        sizes = page.evaluate(TEXT_SIZES)
        assert min(sizes) >= LEGIBLE_PX
        assert page.errors == [], page.errors


def test_the_readme_graph_is_legible_at_a_readme_width(tmp_path) -> None:  # type: ignore[no-untyped-def]
    svg = (ROOT / "docs" / "shop.svg").read_text()
    assert "docs/shop.svg" in (ROOT / "README.md").read_text()
    assert 'class="node legend"' in svg, "docs/shop.svg is drawn by the current choreo (regenerate it: see the README)"
    smallest_pt = min(float(x) for x in re.findall(r'font-size="([\d.]+)"', svg))
    page_file = tmp_path / "readme.html"
    page_file.write_text(  # a README column: the image scaled down to the width when wider, never up
        f"<!doctype html><body style='margin:0'><article style='width:{WIDTH}px;padding:0 16px;box-sizing:border-box'>"
        f"<img id='g' src='{(ROOT / 'docs' / 'shop.svg').as_uri()}' style='max-width:100%'></article></body>"
    )
    with Browser(width=WIDTH + 100, height=900) as page:
        page.open(page_file.as_uri())
        shown, natural = page.evaluate("[document.getElementById('g').width, document.getElementById('g').naturalWidth]")
        page.screenshot(tmp_path / "readme.png")
        assert natural > 0
        width_pt = float(re.search(r'<svg width="([\d.]+)pt"', svg).group(1))
        smallest_px = smallest_pt * shown / width_pt  # the image's points, as many CSS pixels as it is shown wide
        assert smallest_px >= LEGIBLE_PX, f"smallest text {smallest_px:.1f} px in a {WIDTH} px README column"
        assert page.errors == [], page.errors


@pytest.mark.slow
def test_the_live_map_shows_rates_lag_and_errors_of_the_running_mesh(procs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import os
    import signal
    import subprocess
    import threading
    import time

    from choreo.node import Node, NodeConfig

    from .observed import PlaceOrder, orders, payments, shipping

    fast = NodeConfig(heartbeat=0.1, suspect_after=1.0, dead_after=3.0)
    seed = procs.start(orders, config=fast)
    procs.start(payments, peers=[seed.endpoint], config=fast)
    procs.start(shipping, peers=[seed.endpoint], config=fast)
    stop = threading.Event()

    def traffic() -> None:  # orders keep coming until the test has seen them on the page
        async def place() -> None:
            async with Node(None, peers=[seed.endpoint], config=fast) as client:
                await client.wait_for({"orders": 1, "payments": 1, "shipping": 1}, timeout=20)
                n = 0
                while not stop.is_set():
                    await client.send(PlaceOrder(order_id=f"o-{n}"), timeout=20)
                    n += 1
                    await asyncio.sleep(0.05)

        asyncio.run(place())

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    server = subprocess.Popen(
        [sys.executable, "-m", "choreo", "graph", "--peer", seed.endpoint, "--live", "--interval", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        # started as a script's background job is (CI's may be): SIGINT ignored, which Python
        # keeps; Ctrl-C below must stop it all the same
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "PYTHONFAULTHANDLER": "1"},
    )  # fmt: skip
    try:
        line = server.stdout.readline()  # type: ignore[union-attr]
        match = re.search(r"at (http://127\.0\.0\.1:\d+/) \(Ctrl-C stops\)", line)
        assert match, f"choreo graph --live said {line!r}; stderr: {server.stderr.read() if server.poll() is not None else ''}"  # type: ignore[union-attr]
        with Browser(width=WIDTH, height=1200) as page:
            page.open(match.group(1))
            handled = "live:edge:message:PlaceOrder->service:orders:handles"
            deadline = time.monotonic() + 60
            state: dict = {}
            while time.monotonic() < deadline:
                state = page.evaluate(
                    "(() => { const t = id => { const e = document.getElementById(id);"
                    " return e ? [e.textContent, e.getAttribute('class')] : null; };"
                    f" return {{edge: t('{handled}'), ship: t('live:service:shipping'),"
                    " status: document.getElementById('live-status').textContent}; })()"
                )
                if state["edge"] and state["ship"] and "dead letter" in state["ship"][0]:
                    break
                time.sleep(0.2)
            assert state.get("edge") and re.fullmatch(r"\d+(\.\d)?/s", state["edge"][0]), state  # no errors there
            assert state["ship"][1] == "live bad", "shipping fails every order: drawn red"
            assert re.search(r"lag \d+, \d+ dead letters?", state["ship"][0]), state
            assert state["status"].startswith("live: "), state
            sizes = page.evaluate("Array.from(document.querySelectorAll('text.live')).map(t => "
                                  "parseFloat(getComputedStyle(t).fontSize) * t.getScreenCTM().a)")  # fmt: skip
            assert min(sizes) >= 10
            page.screenshot(tmp_path / "live-map.png")
            assert page.errors == [], page.errors
    finally:
        stop.set()
        os.killpg(server.pid, signal.SIGINT)
        try:
            try:
                code = server.wait(30)  # a mesh query in flight finishes first (its timeouts bound it)
            except subprocess.TimeoutExpired:  # where it is stuck: faulthandler prints every thread
                os.killpg(server.pid, signal.SIGABRT)
                server.wait(10)
                stuck = server.stderr.read()[-6000:]  # type: ignore[union-attr]
                raise AssertionError(f"choreo graph --live did not stop on Ctrl-C:\n{stuck}") from None
            assert code == 0, server.stderr.read()  # type: ignore[union-attr]
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
            server.stdout.close()  # type: ignore[union-attr]
            server.stderr.close()  # type: ignore[union-attr]
        sender.join(30)
