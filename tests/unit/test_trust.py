"""choreo.trust: key files, the policy model, and ``choreo keys``; no sockets."""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path

import pytest
import zmq.auth

from choreo.cli import main
from choreo.errors import ChoreoUsageError
from choreo.trust import (
    Permissions,
    Policy,
    Security,
    create_key,
    read_certificate,
    read_key_directory,
)

SHOP = Policy(
    {
        "orders-1": Permissions.of(serves=["orders"]),
        "mobile": Permissions.of(serves=["mobile"], originates=["PlaceOrder"]),
        "ops": Permissions.of(admin=["stats", "spans", "dlq.*"]),
        "root": Permissions.of(serves=["*"], originates=["*"], admin=["*"]),
    }
)


# ---------------------------------------------------------------------------------------- policy


def test_a_client_key_may_send_the_entry_point_but_not_what_the_entry_service_sends() -> None:
    assert SHOP.may_originate("mobile", "PlaceOrder") is None
    assert SHOP.may_originate("mobile", "CreateOrder") == "key 'mobile' may not originate CreateOrder (it originates: PlaceOrder)"
    assert SHOP.may_originate("orders-1", "CreateOrder") == "key 'orders-1' may not originate CreateOrder (it originates: nothing)"


def test_serving_is_per_service() -> None:
    assert SHOP.may_serve("orders-1", "orders") is None
    assert SHOP.may_serve("orders-1", "payments") == "key 'orders-1' may not serve payments (it serves: orders)"
    assert SHOP.may_serve("root", "payments") is None


def test_admin_queries_exact_family_and_all() -> None:
    assert SHOP.may_call("ops", "stats") is None
    assert SHOP.may_call("ops", "dlq.list") is None and SHOP.may_call("ops", "dlq.replay") is None
    assert SHOP.may_call("ops", "trace") == "key 'ops' may not call trace (it may call: dlq.*, spans, stats)"
    assert SHOP.may_call("mobile", "stats") == "key 'mobile' may not call stats (it may call: nothing)"
    assert SHOP.may_call("root", "anything.at.all") is None
    assert Policy({"x": Permissions.of(admin=["a.*"])}).may_call("x", "a.b.c") is None
    assert Policy({"x": Permissions.of(admin=["a.*"])}).may_call("x", "ab") is not None


def test_no_key_and_an_unknown_key_may_do_nothing() -> None:
    for check in (SHOP.may_serve, SHOP.may_originate, SHOP.may_call):
        assert check(None, "x") == "no authenticated key: this mesh admits only the keys it trusts"
        assert check("stranger", "x") == "key 'stranger' is not trusted by this mesh"
    assert SHOP.permissions("stranger") is None and SHOP.permissions(None) is None
    assert SHOP.names == {"orders-1", "mobile", "ops", "root"}


@pytest.mark.parametrize("bad", ["two words", "a,b", 'q"uote', "#x"])
def test_permission_entries_are_single_names(bad: str) -> None:
    with pytest.raises(ChoreoUsageError, match="is not a name"):
        Permissions.of(serves=[bad])


def test_permissions_round_trip_through_certificate_metadata() -> None:
    p = Permissions.of(serves=["orders", "payments"], originates=["PlaceOrder"], admin=["*"])
    meta = p.to_metadata()
    assert meta == {"serves": "orders payments", "originates": "PlaceOrder", "admin": "*"}
    assert Permissions.from_metadata(meta) == p
    assert Permissions.from_metadata({"serves": " orders,payments ", "admin": "*"}).serves == {"orders", "payments"}
    assert str(Permissions()) == "nothing"


# ---------------------------------------------------------------------------------------- key files


def test_create_key_writes_pyzmq_certificates_with_rights_and_a_private_secret(tmp_path: Path) -> None:
    cert = create_key(tmp_path, "orders-1", serves=["orders"], admin=["stats"])
    public, secret = tmp_path / "orders-1.key", tmp_path / "orders-1.key_secret"
    assert cert.path == secret and cert.permissions == Permissions.of(serves=["orders"], admin=["stats"])
    # pyzmq reads them: the public file has no secret, the secret file has both
    assert zmq.auth.load_certificate(public) == (cert.public_key, None)
    assert zmq.auth.load_certificate(secret) == (cert.public_key, cert.secret_key)
    assert zmq.auth.load_certificates(tmp_path) == {cert.public_key: True}
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    # and so do we, rights included (from the public file: what the mesh's copy says)
    assert read_certificate(public).permissions == cert.permissions
    assert read_certificate(public).secret_key is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary file was left behind"


def test_create_key_never_overwrites(tmp_path: Path) -> None:
    create_key(tmp_path, "a")
    with pytest.raises(ChoreoUsageError, match="a.key exists"):
        create_key(tmp_path, "a")


@pytest.mark.parametrize("name", ["", "has space", "-dash-first", "a@b", "x/y", "a" * 65, "orders#1"])
def test_key_names_are_file_names_and_principals(tmp_path: Path, name: str) -> None:
    with pytest.raises(ChoreoUsageError, match="key name must be"):
        create_key(tmp_path, name)


def test_a_malformed_certificate_is_named(tmp_path: Path) -> None:
    (tmp_path / "bad.key").write_text("curve\n    public-key = \"short\"\n")
    with pytest.raises(ChoreoUsageError, match=r"bad.key: no valid public-key"):
        read_key_directory(tmp_path)
    (tmp_path / "bad.key").write_text("metadata\n  serves = \"a b\"\ncurve\n    public-key = \"" + "x" * 40 + "\"\n    stray\n")
    with pytest.raises(ChoreoUsageError, match=r"bad.key:5: expected 'name = value'"):
        read_key_directory(tmp_path)


def test_one_public_key_under_two_names_is_refused(tmp_path: Path) -> None:
    create_key(tmp_path, "a")
    (tmp_path / "b.key").write_text((tmp_path / "a.key").read_text())
    with pytest.raises(ChoreoUsageError, match="keys 'a' and 'b' are the same public key"):
        read_key_directory(tmp_path)


# ---------------------------------------------------------------------------------------- Security


def test_security_load_gives_the_key_pair_trusted_keys_and_policy(tmp_path: Path) -> None:
    own = create_key(tmp_path, "orders-1", serves=["orders"])
    other = create_key(tmp_path, "mobile", originates=["PlaceOrder"])
    s = Security.load(tmp_path, "orders-1")
    assert (s.key_name, s.public_key, s.secret_key) == ("orders-1", own.public_key, own.secret_key)
    assert s.trusted == {"orders-1": own.public_key, "mobile": other.public_key}
    assert s.server_key("mobile") == other.public_key and s.server_key("nobody") is None
    assert s.name_of(other.public_key) == "mobile"
    assert s.name_of(zmq.utils.z85.decode(other.public_key)) == "mobile"  # the 32 raw bytes too
    assert s.policy.may_originate("mobile", "PlaceOrder") is None
    assert "secret" not in repr(s) and own.secret_key.decode() not in repr(s)


def test_security_load_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ChoreoUsageError, match=r"keys directory .*nowhere does not exist: make keys with 'choreo keys new"):
        Security.load(tmp_path / "nowhere", "a")
    create_key(tmp_path, "a")
    with pytest.raises(ChoreoUsageError, match=r"no secret key .*b.key_secret: make it with 'choreo keys new b --dir"):
        Security.load(tmp_path, "b")
    os.unlink(tmp_path / "a.key")
    with pytest.raises(ChoreoUsageError, match="do not include this node's own key 'a'"):
        Security.load(tmp_path, "a")


def test_the_trusted_set_follows_the_directory(tmp_path: Path) -> None:
    create_key(tmp_path, "a")
    s = Security.load(tmp_path, "a")
    assert s.refresh(0.0) is False  # nothing changed
    b = create_key(tmp_path, "b", admin=["stats"])
    assert s.server_key("b") is None
    assert s.refresh(0.0) is True and s.server_key("b") == b.public_key
    assert s.policy.may_call("b", "stats") is None
    assert s.refresh(3600.0) is False  # at most once per interval
    os.unlink(tmp_path / "b.key")  # revoked
    assert s.refresh(0.0) is True and s.name_of(b.public_key) is None
    # a directory that stops reading keeps the last good view
    (tmp_path / "c.key").write_text("garbage\n")
    assert s.refresh(0.0) is False and set(s.trusted) == {"a"}


def test_security_travels_to_a_child_process_by_pickle(tmp_path: Path) -> None:
    create_key(tmp_path, "a")
    s = Security.load(tmp_path, "a")
    t = pickle.loads(pickle.dumps(s))
    assert (t.key_name, t.public_key, t.secret_key, t.trusted, t.keys_dir) == (
        s.key_name, s.public_key, s.secret_key, s.trusted, s.keys_dir)
    create_key(tmp_path, "b")
    assert t.refresh(0.0) and "b" in t.trusted  # and keeps following the directory


# ---------------------------------------------------------------------------------------- choreo keys


def test_choreo_keys_new_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "keys")
    assert main(["keys", "new", "orders-1", "--dir", d, "--serves", "orders"]) == 0
    assert main(["keys", "new", "mobile", "--dir", d, "--originates", "PlaceOrder", "GetOrder"]) == 0
    assert main(["keys", "new", "ops", "--dir", d, "--admin", "*"]) == 0
    out = capsys.readouterr().out
    assert "orders-1.key         public: copy it into the keys directory of every node" in out
    assert "mobile may: originates GetOrder PlaceOrder" in out
    assert main(["keys", "list", "--dir", d]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listing] == ["mobile", "ops", "orders-1"]
    assert listing[2].endswith("serves orders (secret here)")
    assert Security.load(d, "ops").policy.may_call("ops", "dlq.replay") is None


def test_choreo_keys_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "new", "a b", "--dir", str(tmp_path)]) == 2
    assert main(["keys", "new", "a", "--dir", str(tmp_path)]) == 0
    assert main(["keys", "new", "a", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("choreo: error: key name must be") and err[1].startswith("choreo: error: ") and len(err) == 2
    assert "a.key" in err[1] and "exists" in err[1]
