"""Trust: which keys a mesh admits, and what each key may do.

How this works. Every node holds a CURVE key pair, stored as two ZeroMQ certificates in the
format of pyzmq's ``zmq.auth``: ``NAME.key`` (public) and ``NAME.key_secret`` (secret, mode
0600, never leaves its host). A mesh trusts a *keys directory* of public certificates, the same
on every host. What a key may do is written in the metadata of its public certificate in that
directory, so the directory is at once the list of members and of their rights::

    metadata
        serves = "orders"                     # may run instances of orders (claim its partitions)
        originates = "PlaceOrder GetOrder"    # may send these types from outside a handler
        admin = "stats spans trace"           # may call these system queries ("*": all, "dlq.*")
    curve
        public-key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"

Why metadata and not a policy file beside the keys: one file per member means adding a
member is copying one file, revoking is deleting it, rotating is both, and a key can never be
trusted without rights written down, or have rights without being trusted. The rights that count
are those in the *verifier's* copy of the certificate: what a key holder writes in its own files
changes nothing elsewhere. Names (the file name without ``.key``) are what the engine sees as a
frame's *principal*.

This module is pure: no sockets, no threads. Only :func:`create_key` imports zmq, for
``zmq.curve_keypair()``. The transport (:mod:`choreo.transport`) puts CURVE on the sockets and
runs the ZAP handler that admits the keys of a :class:`Security`; the engine asks its
:class:`Policy`::

    security = Security.load("keys", "orders-1")
    reason = security.policy.may_serve("payments-1", "payments")   # None: allowed; else why not
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ChoreoUsageError

__all__ = [
    "ADMIN_METHODS",
    "Certificate",
    "Permissions",
    "Policy",
    "Security",
    "create_key",
    "read_certificate",
    "read_key_directory",
]

log = logging.getLogger("choreo.trust")

#: The system queries a node answers (``may_call`` takes any name; these are the ones that exist).
ADMIN_METHODS = ("spec", "stats", "peers", "spans", "trace", "dlq.list", "dlq.show", "dlq.letters", "dlq.replay")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ENTRY = re.compile(r"[^\s,\"'#]{1,200}")
_Z85 = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
_Z85_CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"


def check_key_name(name: str) -> str:
    """``name`` if it can name a key (a file name and a principal), else :class:`ChoreoUsageError`.

    >>> check_key_name("orders-1")
    'orders-1'
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ChoreoUsageError(
            f"key name must be 1-64 letters, digits, '_', '.' or '-' (starting with a letter or digit), got {name!r}"
        )
    return name


def _z85_encode(raw: bytes) -> bytes:
    chars = []
    for i in range(0, len(raw), 4):
        value = int.from_bytes(raw[i : i + 4], "big")
        block = []
        for _ in range(5):
            value, digit = divmod(value, 85)
            block.append(_Z85_CHARS[digit])
        chars.extend(reversed(block))
    return "".join(chars).encode("ascii")


# ================================================================================ what a key may do


@dataclass(frozen=True)
class Permissions:
    """What one key may do. ``"*"`` in a set means anything; in ``admin``, ``"dlq.*"`` means every ``dlq.`` query.

    >>> p = Permissions(serves=frozenset({"orders"}), admin=frozenset({"stats", "dlq.*"}))
    >>> p.to_metadata()["admin"]
    'dlq.* stats'
    """

    serves: frozenset[str] = frozenset()
    originates: frozenset[str] = frozenset()
    admin: frozenset[str] = frozenset()

    @classmethod
    def of(cls, serves: Iterable[str] = (), originates: Iterable[str] = (), admin: Iterable[str] = ()) -> Permissions:
        """Build from lists, checking every entry (``ChoreoUsageError`` naming a bad one)."""
        return cls(_entries(serves, "serves"), _entries(originates, "originates"), _entries(admin, "admin"))

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], where: str = "certificate") -> Permissions:
        """Read ``serves``, ``originates`` and ``admin`` (entries separated by spaces or commas)."""
        try:
            lists = (re.split(r"[\s,]+", metadata.get(k, "").strip()) for k in ("serves", "originates", "admin"))
            return cls.of(*lists)
        except ChoreoUsageError as exc:
            raise ChoreoUsageError(f"{where}: {exc}") from None

    def to_metadata(self) -> dict[str, str]:
        return {"serves": " ".join(sorted(self.serves)), "originates": " ".join(sorted(self.originates)),
                "admin": " ".join(sorted(self.admin))}

    def __str__(self) -> str:
        parts = [f"{k} {v}" for k, v in self.to_metadata().items() if v]
        return ", ".join(parts) or "nothing"


def _entries(values: Iterable[str], what: str) -> frozenset[str]:
    if isinstance(values, str):
        values = [values]
    out = set()
    for v in values:
        if not v:
            continue
        if not isinstance(v, str) or not _ENTRY.fullmatch(v):
            raise ChoreoUsageError(f"{what}: {v!r} is not a name (no spaces, commas, quotes or '#')")
        out.add(v)
    return frozenset(out)


_WORDS = {"serves": ("serve", "serves"), "originates": ("originate", "originates"), "admin": ("call", "may call")}


def _allows(granted: frozenset[str], name: str, families: bool) -> bool:
    if "*" in granted or name in granted:
        return True
    if not families:
        return False
    head, dot, _ = name.rpartition(".")
    while dot:  # "dlq.*" allows "dlq.list"; "a.*" allows "a.b.c"
        if f"{head}.*" in granted:
            return True
        head, dot, _ = head.rpartition(".")
    return False


class Policy:
    """Who may do what, by key name (a frame's *principal*). Each check returns None when allowed,
    else the reason as one sentence, ready for a refusal counter and a log line::

        policy = Policy({"mobile": Permissions.of(originates=["PlaceOrder"])})
        policy.may_originate("mobile", "PlaceOrder")    # None
        policy.may_originate("mobile", "CreateOrder")   # "key 'mobile' may not originate CreateOrder ..."

    A principal of ``None`` (a frame that came in without an authenticated key) may do nothing.
    """

    def __init__(self, grants: Mapping[str, Permissions]) -> None:
        self._grants = dict(grants)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._grants)

    def permissions(self, principal: str | None) -> Permissions | None:
        """What ``principal`` may do; None for an unknown key (or no key)."""
        return self._grants.get(principal) if principal is not None else None

    def _who(self, principal: str | None) -> tuple[Permissions | None, str | None]:
        if principal is None:
            return None, "no authenticated key: this mesh admits only the keys it trusts"
        perms = self._grants.get(principal)
        if perms is None:
            return None, f"key {principal!r} is not trusted by this mesh"
        return perms, None

    def _check(self, principal: str | None, right: str, name: str) -> str | None:
        perms, why = self._who(principal)
        if perms is None:
            return why
        granted: frozenset[str] = getattr(perms, right)
        if _allows(granted, name, right == "admin"):
            return None
        verb, has = _WORDS[right]
        return f"key {principal!r} may not {verb} {name} (it {has}: {_listed(granted)})"

    def may_serve(self, principal: str | None, service: str) -> str | None:
        """May ``principal`` run an instance of ``service`` (claim its partitions)?"""
        return self._check(principal, "serves", service)

    def may_originate(self, principal: str | None, message_type: str) -> str | None:
        """May ``principal`` send or emit ``message_type`` from outside a handler (an entry point)?"""
        return self._check(principal, "originates", message_type)

    def may_call(self, principal: str | None, method: str) -> str | None:
        """May ``principal`` call the system query ``method`` (``stats``, ``dlq.replay``...)?"""
        return self._check(principal, "admin", method)

    def __repr__(self) -> str:
        return f"Policy({', '.join(f'{n}: {p}' for n, p in sorted(self._grants.items()))})"


def _listed(values: frozenset[str]) -> str:
    return ", ".join(sorted(values)) or "nothing"


# ================================================================================ certificates


@dataclass(frozen=True)
class Certificate:
    """One certificate file: a key's name, its public key (Z85, 40 bytes), its rights; the secret
    key only when read from a ``.key_secret`` file."""

    name: str
    public_key: bytes
    permissions: Permissions = Permissions()
    secret_key: bytes | None = field(default=None, repr=False)
    path: Path | None = None


def _parse_zpl(text: str, where: str) -> dict[str, dict[str, str]]:
    """The sections of a ZPL certificate (``metadata``, ``curve``) as name -> value maps."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            current = sections.setdefault(line.strip(), {})
            continue
        name, eq, value = line.strip().partition("=")
        if not eq or current is None:
            raise ChoreoUsageError(f"{where}:{number}: expected 'name = value' inside a section, got {line.strip()!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        current[name.strip()] = value
    return sections


def read_certificate(path: str | os.PathLike[str]) -> Certificate:
    """Read one ``NAME.key`` or ``NAME.key_secret`` file (``ChoreoUsageError`` saying what is wrong).

    The format is pyzmq's (``zmq.auth.load_certificate`` reads these files too).
    """
    path = Path(path)
    if path.name.endswith(SECRET_SUFFIX):
        name = path.name[: -len(SECRET_SUFFIX)]
    elif path.name.endswith(PUBLIC_SUFFIX):
        name = path.name[: -len(PUBLIC_SUFFIX)]
    else:
        raise ChoreoUsageError(f"{path}: a certificate is named NAME.key (public) or NAME.key_secret (secret)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ChoreoUsageError(f"cannot read certificate {path}: {exc}") from None
    if not _NAME.fullmatch(name):
        raise ChoreoUsageError(f"{path}: {name!r} cannot name a key (letters, digits, '_', '.', '-')")
    sections = _parse_zpl(text, str(path))
    curve = sections.get("curve", {})
    public = curve.get("public-key", "").encode()
    if not _Z85.fullmatch(public.decode("ascii", "replace")):
        raise ChoreoUsageError(f"{path}: no valid public-key in its curve section (40 Z85 characters)")
    secret = curve.get("secret-key")
    secret_key = None
    if secret is not None:
        if not _Z85.fullmatch(secret):
            raise ChoreoUsageError(f"{path}: the secret-key is not 40 Z85 characters")
        secret_key = secret.encode()
    permissions = Permissions.from_metadata(sections.get("metadata", {}), str(path))
    return Certificate(name, public, permissions, secret_key, path)


def read_key_directory(directory: str | os.PathLike[str]) -> dict[str, Certificate]:
    """Every public certificate (``*.key``) of a keys directory, by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ChoreoUsageError(
            f"keys directory {directory} does not exist: make keys with 'choreo keys new NAME --dir {directory}'"
        )
    certs: dict[str, Certificate] = {}
    by_key: dict[bytes, str] = {}
    for path in sorted(directory.glob("*" + PUBLIC_SUFFIX)):
        cert = read_certificate(path)
        if cert.public_key in by_key:
            raise ChoreoUsageError(
                f"{directory}: keys {by_key[cert.public_key]!r} and {cert.name!r} are the same public key: remove one"
            )
        by_key[cert.public_key] = cert.name
        certs[cert.name] = cert
    return certs


_BANNER = """#   ****  Generated on {date} by choreo keys new  ****
#   ZeroMQ CURVE {kind} Certificate
{note}
"""
_PUBLIC_NOTE = """#   Copy it into the keys directory of every node of the mesh. Its metadata says
#   what the key may do there: serves, originates, admin."""
_SECRET_NOTE = """#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions:
#   it stays on the host that runs as this key."""


def _certificate_text(kind: str, note: str, public: bytes, secret: bytes | None, perms: Permissions) -> str:
    date = datetime.datetime.now().isoformat(timespec="seconds")
    lines = [_BANNER.format(date=date, kind=kind, note=note), "metadata"]
    lines += [f'    {k} = "{v}"' for k, v in perms.to_metadata().items()]
    lines += ["curve", f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def create_key(
    directory: str | os.PathLike[str],
    name: str,
    *,
    serves: Iterable[str] = (),
    originates: Iterable[str] = (),
    admin: Iterable[str] = (),
) -> Certificate:
    """Make a key pair: ``DIRECTORY/NAME.key`` (public, with its rights) and ``NAME.key_secret`` (0600).

    Refuses to overwrite an existing key (``ChoreoUsageError``). Returns the secret certificate::

        create_key("keys", "orders-1", serves=["orders"])
        create_key("keys", "mobile", originates=["PlaceOrder"])
        create_key("keys", "ops", admin=["*"])
    """
    import zmq  # the only use of zmq in this module: a fresh key pair from libsodium

    check_key_name(name)
    perms = Permissions.of(serves, originates, admin)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public_path, secret_path = directory / (name + PUBLIC_SUFFIX), directory / (name + SECRET_SUFFIX)
    for p in (public_path, secret_path):
        if p.exists():
            raise ChoreoUsageError(f"{p} exists: choose another name, or remove the old key first")
    public, secret = zmq.curve_keypair()
    _write_new(secret_path, _certificate_text("**Secret**", _SECRET_NOTE, public, secret, perms), 0o600)
    _write_new(public_path, _certificate_text("Public", _PUBLIC_NOTE, public, None, perms), 0o644)
    return Certificate(name, public, perms, secret, secret_path)


def _write_new(path: Path, text: str, mode: int) -> None:
    """Write whole, then publish under ``path`` (failing if it exists): a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise ChoreoUsageError(f"{path} exists: choose another name, or remove the old key first") from None
    finally:
        os.unlink(tmp)


# ================================================================================ a node's security


@dataclass(frozen=True)
class _Trusted:
    """One consistent view of the keys directory (replaced whole when the directory changes)."""

    certs: Mapping[str, Certificate]
    by_key: Mapping[bytes, str]  # Z85 public key -> name
    policy: Policy
    fingerprint: tuple[tuple[str, int, int], ...] = ()


def _trusted(certs: Mapping[str, Certificate], fingerprint: tuple[tuple[str, int, int], ...] = ()) -> _Trusted:
    return _Trusted(
        dict(certs),
        {c.public_key: n for n, c in certs.items()},
        Policy({n: c.permissions for n, c in certs.items()}),
        fingerprint,
    )


def _fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    out = []
    try:
        for entry in os.scandir(directory):
            if entry.name.endswith(PUBLIC_SUFFIX):
                st = entry.stat()
                out.append((entry.name, st.st_mtime_ns, st.st_size))
    except OSError:
        return ()
    return tuple(sorted(out))


class Security:
    """This node's key pair and the keys its mesh trusts, with what each may do.

    ::

        security = Security.load("keys", "orders-1")     # keys/orders-1.key_secret + every keys/*.key
        node = Node(orders, bind="tcp://10.0.0.5:7001", security=security)
        security.policy.may_call("ops", "dlq.replay")     # None, or why not

    ``key_name`` is this node's principal; ``trusted`` maps every trusted key's name to its Z85
    public key. Loaded from a directory, the trusted set follows the directory: :meth:`refresh`
    (called by the transport at handshakes, at most once a second) re-reads it when a ``.key``
    file was added, removed or changed, so keys are added, revoked and rotated without restarts.
    """

    def __init__(
        self,
        key: Certificate,
        trusted: Iterable[Certificate],
        *,
        keys_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if key.secret_key is None:
            raise ChoreoUsageError(f"key {key.name!r} has no secret key: load its .key_secret file")
        certs = {c.name: c for c in trusted}
        own = certs.get(key.name)
        if own is None:
            raise ChoreoUsageError(
                f"the trusted keys do not include this node's own key {key.name!r}: "
                f"copy {key.name}{PUBLIC_SUFFIX} into the keys directory"
            )
        if own.public_key != key.public_key:
            raise ChoreoUsageError(
                f"{key.name}{PUBLIC_SUFFIX} and {key.name}{SECRET_SUFFIX} hold different public keys: "
                "they are not one key pair"
            )
        self.key_name = key.name
        self.public_key = key.public_key
        self._secret_key = key.secret_key
        self.keys_dir = Path(keys_dir) if keys_dir is not None else None
        self._state = _trusted(certs, _fingerprint(self.keys_dir) if self.keys_dir else ())
        self._lock = threading.Lock()
        self._checked = time.monotonic()

    @classmethod
    def load(cls, keys_dir: str | os.PathLike[str], key_name: str) -> Security:
        """``KEYS_DIR/KEY_NAME.key_secret`` as this node's key pair; every ``KEYS_DIR/*.key`` as trusted.

        ``ChoreoUsageError`` with the fix when a file is missing or malformed.
        """
        keys_dir = Path(keys_dir)
        check_key_name(key_name)
        certs = read_key_directory(keys_dir)
        secret_path = keys_dir / (key_name + SECRET_SUFFIX)
        if not secret_path.is_file():
            raise ChoreoUsageError(
                f"no secret key {secret_path}: make it with 'choreo keys new {key_name} --dir {keys_dir}' "
                "(the .key_secret file stays on the host that runs as that key)"
            )
        key = read_certificate(secret_path)
        if key.secret_key is None:
            raise ChoreoUsageError(f"{secret_path} holds no secret-key")
        try:
            mode = secret_path.stat().st_mode
        except OSError:
            mode = 0
        if mode & 0o077:
            log.warning("%s is readable by other users (mode %o): chmod 600 it", secret_path, mode & 0o777)
        return cls(key, certs.values(), keys_dir=keys_dir)

    # -- what the transport and the engine ask ---------------------------------------------------

    @property
    def secret_key(self) -> bytes:
        """This node's secret key (Z85). Kept out of ``repr``."""
        return self._secret_key

    @property
    def policy(self) -> Policy:
        """What each trusted key may do (the current view of the keys directory)."""
        return self._state.policy

    @property
    def trusted(self) -> dict[str, bytes]:
        """Every trusted key's name -> its Z85 public key."""
        return {n: c.public_key for n, c in self._state.certs.items()}

    def server_key(self, name: str) -> bytes | None:
        """The Z85 public key of the trusted key ``name`` (to dial a node that runs as it), or None."""
        cert = self._state.certs.get(name)
        return cert.public_key if cert is not None else None

    def name_of(self, public_key: bytes) -> str | None:
        """The name of a trusted public key (Z85, or the 32 raw bytes), or None if it is not trusted."""
        if len(public_key) == 32:
            public_key = _z85_encode(public_key)
        return self._state.by_key.get(public_key)

    def refresh(self, min_interval: float = 1.0) -> bool:
        """Re-read the keys directory if it changed (at most once per ``min_interval`` s); True if it did.

        A directory that no longer reads (a file half-written, a key removed by mistake that
        was our own) keeps the previous view, with a warning.
        """
        if self.keys_dir is None:
            return False
        now = time.monotonic()
        with self._lock:
            if now - self._checked < min_interval:
                return False
            self._checked = now
            fingerprint = _fingerprint(self.keys_dir)
            if fingerprint == self._state.fingerprint:
                return False
            try:
                certs = read_key_directory(self.keys_dir)
                if certs.get(self.key_name) is None or certs[self.key_name].public_key != self.public_key:
                    raise ChoreoUsageError(f"this node's own key {self.key_name!r} is missing or changed")
            except ChoreoUsageError as exc:
                log.warning("keys directory %s changed but does not read: %s (keeping the keys loaded before)",
                            self.keys_dir, exc)
                self._state = _Trusted(self._state.certs, self._state.by_key, self._state.policy, fingerprint)
                return False
            self._state = _trusted(certs, fingerprint)
            log.info("keys directory %s re-read: %d trusted keys", self.keys_dir, len(certs))
            return True

    def __reduce__(self) -> tuple[object, ...]:
        # to a child process (NodeProcess) over its private pipe: the key pair and the current view
        key = Certificate(self.key_name, self.public_key, Permissions(), self._secret_key)
        return (Security, (key, list(self._state.certs.values())), {"keys_dir": self.keys_dir})

    def __setstate__(self, state: dict[str, object]) -> None:
        self.keys_dir = state["keys_dir"]  # type: ignore[assignment]
        if self.keys_dir is not None:
            self._state = _Trusted(self._state.certs, self._state.by_key, self._state.policy, ())

    def __repr__(self) -> str:
        where = f" from {self.keys_dir}" if self.keys_dir else ""
        return f"Security(key {self.key_name!r}, {len(self._state.certs)} trusted keys{where})"
