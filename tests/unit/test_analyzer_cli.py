"""The command line: `choreo graph`, `choreo lint`, `choreo flows`, exit statuses, sources, -o."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # tests/, so analyzer_systems imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from choreo.analyzer import commands
from choreo.cli import build_parser, main
from choreo.spec import SystemSpec

TESTS = Path(__file__).resolve().parents[1]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_lint_exits_0_on_a_clean_system(capsys) -> None:
    status, out, _ = run(capsys, "lint", "analyzer_systems.shop")
    assert status == 0
    assert out.splitlines()[0] == (
        "analyzer_systems.shop: 5 services, 9 message types (2 commands, 6 events, 1 query), 2 entry points"
    )
    assert "no findings" in out


def test_lint_exits_1_when_an_error_level_finding_exists(capsys) -> None:
    status, out, _ = run(capsys, "lint", "analyzer_systems.broken")
    assert status == 1
    assert "command ChargeCard has two owners: payments, billing" in out
    assert "at payments.charge  analyzer_systems.broken:" in out


def test_lint_warnings_pass_unless_fail_on_warning(capsys) -> None:
    assert run(capsys, "lint", "analyzer_systems.warned")[0] == 0
    assert run(capsys, "lint", "analyzer_systems.warned", "--fail-on", "warning")[0] == 1


def test_lint_ignore_drops_rules_and_can_turn_errors_off(capsys) -> None:
    errors = "no-owner,several-owners,query-side-effects"
    status, out, _ = run(capsys, "lint", "analyzer_systems.broken", "--ignore", errors, "--ignore", "missing-key-field")
    assert status == 0, out
    assert "several-owners" not in out and "cycle" in out
    status, _, err = run(capsys, "lint", "analyzer_systems.broken", "--ignore", "nope")
    assert status == 2 and "unknown rule(s) ['nope']" in err


def test_lint_json_for_ci_tools(capsys) -> None:
    status, out, _ = run(capsys, "lint", "analyzer_systems.broken", "--format", "json")
    doc = json.loads(out)
    assert status == 1
    assert doc["errors"] == 4 and doc["warnings"] == 3
    owners = next(f for f in doc["findings"] if f["code"] == "several-owners")
    assert owners["services"] == ["payments", "billing"]
    assert owners["locations"][0]["module"] == "analyzer_systems.broken"


def test_lint_rules_lists_every_rule(capsys) -> None:
    from choreo.analyzer import RULES

    status, out, _ = run(capsys, "lint", "--rules")
    assert status == 0
    assert [line.split()[0] for line in out.splitlines()] == list(RULES)


def test_flows_prints_the_tree(capsys) -> None:
    status, out, _ = run(capsys, "flows", "analyzer_systems.shop")
    assert status == 0
    assert "PlaceOrder (command, from storefront): depth 4, fan-out 1, 4 services, 6 messages" in out
    assert "└─ orders.place  analyzer_systems.shop.orders:10" in out
    assert "RefundPayment (command, from outside)" in out
    assert "\x1b[" not in out  # not a terminal: no colour


def test_flows_one_entry_and_json(capsys) -> None:
    status, out, _ = run(capsys, "flows", "analyzer_systems.shop", "--entry", "RefundPayment")
    assert status == 0 and "RefundPayment" in out and "PlaceOrder (command" not in out
    status, _, err = run(capsys, "flows", "analyzer_systems.shop", "--entry", "OrderPlaced")
    assert status == 2 and "OrderPlaced is not an entry point" in err and "PlaceOrder, RefundPayment" in err
    status, out, _ = run(capsys, "flows", "analyzer_systems.shop", "--format", "json")
    assert [f["entry"] for f in json.loads(out)["flows"]] == ["PlaceOrder", "RefundPayment"]


def test_graph_text_is_the_default(capsys) -> None:
    status, out, _ = run(capsys, "graph", "analyzer_systems.shop")
    assert status == 0
    assert "PlaceOrder (command, from storefront)" in out and "no findings" in out


def test_graph_writes_files_and_takes_the_format_from_the_suffix(capsys, tmp_path) -> None:
    target = tmp_path / "shop.mmd"
    status, out, err = run(capsys, "graph", "analyzer_systems.shop", "-o", str(target))
    assert status == 0 and out == "" and f"wrote {target}" in err
    assert target.read_text().startswith("flowchart LR")
    target = tmp_path / "shop.txt"
    run(capsys, "graph", "analyzer_systems.broken", "-o", str(target), "--format", "text")
    assert "several-owners" in target.read_text() and "\x1b[" not in target.read_text()


def test_graph_refuses_a_file_name_that_names_no_format_or_another_one(capsys, tmp_path) -> None:
    status, _, err = run(capsys, "graph", "analyzer_systems.shop", "-o", str(tmp_path / "shop.pdf"))
    assert status == 2 and err.startswith(f"choreo: error: cannot tell the format of '{tmp_path / 'shop.pdf'}' from its name")
    assert "--format" in err and err.count("\n") == 1
    status, _, err = run(capsys, "graph", "analyzer_systems.shop", "-o", str(tmp_path / "shop.svg"), "--format", "mermaid")
    assert (status, err) == (2, f"choreo: error: -o {tmp_path / 'shop.svg'} names svg output, but --format says mermaid\n")
    assert not list(tmp_path.iterdir()), "nothing written"
    # a name without a known suffix is fine when --format says what to write; AsyncAPI is JSON
    assert run(capsys, "graph", "analyzer_systems.shop", "-o", str(tmp_path / "shop"), "--format", "mermaid")[0] == 0
    assert run(capsys, "graph", "analyzer_systems.shop", "-o", str(tmp_path / "api.json"), "--format", "asyncapi")[0] == 0
    assert (tmp_path / "shop").read_text().startswith("flowchart")


def test_graph_json_reads_back_to_the_same_output(capsys, tmp_path) -> None:
    first = tmp_path / "shop.json"
    run(capsys, "graph", "analyzer_systems.shop", "-f", "json", "-o", str(first))
    status, again, _ = run(capsys, "graph", str(first), "-f", "json")
    assert status == 0 and again == first.read_text()
    broken = tmp_path / "broken.json"
    run(capsys, "graph", "analyzer_systems.broken", "-o", str(broken))
    assert run(capsys, "lint", str(broken))[0] == 1  # the findings come back too: they are recomputed


def test_color_always_and_never(capsys) -> None:
    assert "\x1b[" in run(capsys, "flows", "analyzer_systems.shop", "--color", "always")[1]
    assert "\x1b[" not in run(capsys, "flows", "analyzer_systems.shop", "--color", "never")[1]


def test_unreadable_targets_exit_2_with_the_reason(capsys, tmp_path) -> None:
    status, _, err = run(capsys, "graph", "no_such_module_xyz")
    assert status == 2 and "no module named 'no_such_module_xyz'" in err
    status, _, err = run(capsys, "lint", "analyzer_systems.empty")
    assert status == 2 and "no choreo.Service found in analyzer_systems.empty" in err
    status, _, err = run(capsys, "lint", "analyzer_systems.failing")
    assert status == 2 and "could not import analyzer_systems.failing.boom: RuntimeError: boom" in err
    status, _, err = run(capsys, "lint", "shop/orders.py")
    assert status == 2 and "looks like a file path" in err
    status, _, err = run(capsys, "lint", str(tmp_path / "missing.json"))
    assert status == 2 and "cannot read" in err
    status, _, err = run(capsys, "lint")
    assert status == 2 and "give a TARGET" in err


def test_the_loader_walks_submodules_but_never_runs_main() -> None:
    # analyzer_systems/shop/__main__.py raises when imported; the services sit in four submodules
    from choreo.analyzer._load import collect_services

    assert [s.name for s in collect_services("analyzer_systems.shop")] == [
        "orders",
        "payments",
        "shipping",
        "notifications",
        "storefront",
    ]


def test_peer_without_the_client_says_so(capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "choreo.client", None)  # as if choreo.client did not exist
    status, _, err = run(capsys, "graph", "--peer", "tcp://127.0.0.1:7400")
    assert status == 2 and "choreo.client.fetch_system_spec" in err
    status, _, err = run(capsys, "graph", "--peer", "127.0.0.1:7400")
    assert status == 2 and "tcp://HOST:PORT" in err
    status, _, err = run(capsys, "graph", "analyzer_systems.shop", "--peer", "tcp://127.0.0.1:7400")
    assert status == 2 and "not both" in err


def test_peer_reads_the_spec_through_the_client(capsys, monkeypatch) -> None:
    from choreo.analyzer._load import collect_services
    from choreo.spec import system_spec

    spec = system_spec(collect_services("analyzer_systems.broken"))
    calls = []

    def fetch_system_spec(peer: str, timeout: float) -> SystemSpec:
        calls.append((peer, timeout))
        return spec

    monkeypatch.setitem(sys.modules, "choreo.client", types.SimpleNamespace(fetch_system_spec=fetch_system_spec))
    status, out, _ = run(capsys, "lint", "--peer", "tcp://10.0.0.5:7400", "--timeout", "2.5")
    assert status == 1 and "command ChargeCard has two owners" in out
    assert calls == [("tcp://10.0.0.5:7400", 2.5)]

    def unreachable(peer: str, timeout: float) -> SystemSpec:
        raise TimeoutError(f"no answer from {peer} within {timeout} s")

    monkeypatch.setitem(sys.modules, "choreo.client", types.SimpleNamespace(fetch_system_spec=unreachable))
    status, _, err = run(capsys, "flows", "--peer", "tcp://10.0.0.5:7400")
    assert status == 2 and "could not read the declarations from tcp://10.0.0.5:7400: TimeoutError" in err


def test_png_refuses_a_terminal(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(commands, "_analysis", lambda args, ignore=None: None)
    monkeypatch.setattr("choreo.analyzer._render.render", lambda analysis, fmt, style, queries="fold": b"\x89PNG")
    status, _, err = run(capsys, "graph", "analyzer_systems.shop", "-f", "png")
    assert status == 2 and "-o FILE.png" in err


def test_each_command_module_registers_its_subcommands() -> None:
    parser = build_parser()
    args = parser.parse_args(["lint", "x", "--fail-on", "warning"])
    assert (args.command, args.func, args.fail_on) == ("lint", commands.run_lint, "warning")
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([])
    assert exit_info.value.code == 2


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def test_python_m_choreo(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "choreo", "lint", "analyzer_systems.broken"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stderr
    assert "several-owners" in done.stdout
    done = subprocess.run([sys.executable, "-m", "choreo", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "graph" in done.stdout and "lint" in done.stdout and "flows" in done.stdout


def test_the_console_script_finds_modules_in_the_current_directory() -> None:
    script = Path(sys.executable).parent / "choreo"
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable}: choreo is not installed in this environment")
    # run from tests/: analyzer_systems is importable from the current directory only
    done = subprocess.run(
        [str(script), "flows", "analyzer_systems.shop"], capture_output=True, text=True, timeout=120, cwd=TESTS
    )
    assert done.returncode == 0, done.stderr
    assert "PlaceOrder (command, from storefront)" in done.stdout


def test_the_analyzer_never_loads_the_runtime_or_transport() -> None:
    code = (
        "import sys\n"
        "from choreo.cli import build_parser\n"
        "build_parser()\n"
        "assert 'networkx' not in sys.modules, 'building the CLI parser imported networkx'\n"
        "from choreo.analyzer import analyze, render, load_spec\n"
        "spec, name = load_spec('analyzer_systems.shop')\n"
        "a = analyze(spec, name=name)\n"
        "for fmt in ('text', 'dot', 'mermaid', 'json', 'asyncapi'):\n"
        "    render(a, fmt)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'zmq' or m.startswith(\n"
        "    ('choreo.node', 'choreo.transport', 'choreo.client', 'choreo._core', 'choreo.core')))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 0, done.stderr
