"""Endpoints checked with one line that shows the form; the address a wildcard bind advertises."""

from __future__ import annotations

import doctest
import importlib
import logging

import pytest

from choreo import endpoints
from choreo.cli import main
from choreo.endpoints import advertised, check_endpoint


@pytest.mark.parametrize("name", ["choreo.endpoints", "choreo.bundled", "choreo.config"])
def test_docstring_examples(name: str) -> None:
    assert doctest.testmod(importlib.import_module(name)).failed == 0


@pytest.mark.parametrize(
    ("value", "bind", "message"),
    [
        ("127.0.0.1:7510", False, "--x must look like tcp://HOST:PORT (or ipc://PATH), got '127.0.0.1:7510': did you mean tcp://127.0.0.1:7510?"),
        ("localhost", False, "--x must look like tcp://HOST:PORT (or ipc://PATH), got 'localhost'"),
        ("http://h:1", False, "--x must look like tcp://HOST:PORT (or ipc://PATH), got 'http://h:1': choreo speaks tcp://, ipc:// and inproc://"),
        ("tcp://h", False, "--x must look like tcp://HOST:PORT (or ipc://PATH), got 'tcp://h': the port is missing"),
        ("tcp://h:99999", False, "--x must look like tcp://HOST:PORT (or ipc://PATH) with a port in 1..65535, got 'tcp://h:99999'"),
        ("tcp://0.0.0.0:7000", False, "--x must name a host to dial, got 'tcp://0.0.0.0:7000': 0.0.0.0 is a wildcard"),
        ("ipc://", False, "--x must look like tcp://HOST:PORT (or ipc://PATH), got 'ipc://': the path is missing"),
    ],
)  # fmt: skip
def test_bad_endpoints_are_refused_with_the_expected_form(value: str, bind: bool, message: str) -> None:
    with pytest.raises(ValueError) as info:
        check_endpoint(value, "--x", bind=bind)
    assert str(info.value) == message


def test_good_endpoints_pass() -> None:
    for value in ("tcp://127.0.0.1:7000", "tcp://[::1]:7000", "tcp://orders.lan:7000", "ipc:///tmp/x", "inproc://a"):
        assert check_endpoint(value) == value
    for value in ("tcp://0.0.0.0:0", "tcp://*:7001", "tcp://127.0.0.1:*"):
        assert check_endpoint(value, bind=True) == value


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--peer", "127.0.0.1:7510"], "--peer must look like tcp://HOST:PORT (or ipc://PATH), got '127.0.0.1:7510': did you mean tcp://127.0.0.1:7510?"),
        (["--bind", "127.0.0.1:7599"], "--bind must look like tcp://HOST:PORT (or ipc://PATH), got '127.0.0.1:7599': did you mean tcp://127.0.0.1:7599?"),
        (["--advertise", "tcp://*:7000"], "--advertise must name a host to dial, got 'tcp://*:7000': * is a wildcard"),
    ],
)  # fmt: skip
def test_choreo_run_refuses_a_bad_endpoint_in_one_line(args: list[str], error: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "examples.shop.orders:orders", *args]) == 2
    assert capsys.readouterr().err == f"choreo: error: {error}\n"


def test_choreo_run_names_a_missing_attribute(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "examples.shop.orders:order"]) == 2
    assert capsys.readouterr().err == (
        "choreo: error: examples.shop.orders:order: examples.shop.orders has no attribute 'order' "
        "(services there: examples.shop.orders:orders)\n"
    )


def test_a_wildcard_bind_advertises_the_interface_that_routes_to_the_seeds(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    routes = {"10.0.0.5": "10.0.0.7", "192.0.2.1": "192.168.1.20"}
    monkeypatch.setattr(endpoints, "route_to", lambda host, port=9, family=None: routes.get(host))
    caplog.set_level(logging.INFO, logger="choreo.transport")
    assert advertised("tcp://0.0.0.0:7001", ["tcp://10.0.0.5:7000"]) == "tcp://10.0.0.7:7001"
    # no seed (the first node), or seeds on this host: the interface that routes off the host
    assert advertised("tcp://0.0.0.0:7001") == "tcp://192.168.1.20:7001"
    assert advertised("tcp://0.0.0.0:7001", ["tcp://127.0.0.1:7000"]) == "tcp://192.168.1.20:7001"
    assert advertised("tcp://0.0.0.0:7001", advertise="tcp://shop.example:7001") == "tcp://shop.example:7001"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # nothing routes off this host: loopback, said with the way out
    routes.clear()
    assert advertised("tcp://0.0.0.0:7001") == "tcp://127.0.0.1:7001"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "advertising loopback" in warning and "--advertise tcp://HOST:PORT" in warning


def test_a_loopback_address_is_warned_about_when_a_seed_is_on_another_host(caplog) -> None:  # type: ignore[no-untyped-def]
    assert advertised("tcp://127.0.0.1:7001", ["tcp://127.0.0.1:7000"]) == "tcp://127.0.0.1:7001"
    assert not caplog.records
    advertised("tcp://127.0.0.1:7001", ["tcp://127.0.0.1:7000", "tcp://10.1.2.3:7000"])
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("advertising tcp://127.0.0.1:7001, a loopback address, while joining through tcp://10.1.2.3:7000")
    assert "--advertise" in warning
