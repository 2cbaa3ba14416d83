"""``parties.toml``: where the three servers listen and which certificate each party presents.

Format (paths are relative to the file's directory)::

    ca = "ca.pem"              # the CA every party trusts
    # plan_hash = "..."        # optional: the plan the client expects (else it only checks
    #                          # that the three servers agree)
    # timeout = 30             # optional default for --timeout (seconds)
    # revoked = ["<sha256>"]   # optional: certificate fingerprints refused whatever else says

    [P0]
    host = "10.0.0.1"          # address the others dial
    port = 7400
    cert = "P0.pem"            # the certificate P0 presents (pinned by everyone else)
    key = "P0.key"             # only needed on P0's own host
    # bind = "0.0.0.0"         # optional listen address if it differs from host

    [P1] ...  [P2] ...

    [client]
    cert = "client.pem"        # the certificate clients present
    key = "client.key"         # only needed where queries are made

    [clients]                  # optional: more clients, each with its own certificate
    alice = "alice.pem"

Identity is decided by certificate pinning: a peer is the party whose configured certificate it
presented (after TLS verified it against ``ca``), so a certificate from another CA, or one that
is not in the file, is refused, and a server cannot be impersonated by the client's certificate.
Every client may have its own certificate (``[clients]``), and a certificate whose SHA-256
fingerprint is listed in ``revoked`` is refused (remove a client by revoking its certificate; the
servers read the list at start).
Errors are :class:`siguard.core.errors.InputError` with one clear line.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from siguard.core.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["PARTY_NAMES", "CLIENT", "PartyEntry", "PartiesConfig", "load_config", "render_config", "party_name",
           "fingerprint_of_pem"]

PARTY_NAMES = ("P0", "P1", "P2", "client")
#: the client's party number: :data:`siguard.runtime.mpc.transport.CLIENT`, restated here so that reading a
#: configuration (``siguard certs``, the parent of ``run --mode processes``) does not import torch
#: (tests/net/test_tls.py checks that the two agree)
CLIENT = 3


def party_name(party: int) -> str:
    """"P0", "P1", "P2" or "client"."""
    return PARTY_NAMES[party] if 0 <= party < len(PARTY_NAMES) else f"party {party}"


@dataclass(frozen=True)
class PartyEntry:
    """One party's section: address (servers only), certificate, optional key, pinned fingerprint."""

    party: int
    host: str | None
    port: int | None
    cert: Path
    key: Path | None
    bind: str | None
    fingerprint: str  # SHA-256 of the DER certificate, hex

    @property
    def name(self) -> str:
        return party_name(self.party)

    @property
    def address(self) -> str:
        """"host:port" (servers)."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class PartiesConfig:
    """A loaded ``parties.toml`` (see the module docstring)."""

    path: Path
    ca: Path
    parties: dict[int, PartyEntry]
    plan_hash: str | None = None
    timeout: float | None = None
    clients: dict[str, str] = field(default_factory=dict)  # name -> fingerprint of the extra clients
    revoked: frozenset[str] = frozenset()

    def __getitem__(self, party: int) -> PartyEntry:
        return self.parties[party]

    def identify(self, der_cert: bytes | None) -> int | None:
        """The party whose configured certificate is ``der_cert`` (DER bytes), or None."""
        if not der_cert:
            return None
        fp = hashlib.sha256(der_cert).hexdigest()
        if fp in self.revoked:
            return None
        for p, entry in self.parties.items():
            if entry.fingerprint == fp:
                return p
        if fp in self.clients.values():
            return CLIENT
        return None

    def is_revoked(self, der_cert: bytes | None) -> bool:
        """True iff ``der_cert``'s fingerprint is in the revocation list."""
        return bool(der_cert) and hashlib.sha256(der_cert).hexdigest() in self.revoked

    def ssl_context(self, party: int, server_side: bool) -> ssl.SSLContext:
        """A TLS 1.3 context for ``party``: its own certificate and key, the CA, peer
        certificates required. Host names are not checked (identity comes from pinning, see
        :meth:`identify`); session tickets are off (no resumption, and no post-handshake writes)."""
        entry = self.parties[party]
        if entry.key is None:
            raise InputError(f"{self.path}: [{entry.name}] has no 'key'; {entry.name} needs its private key")
        if not entry.key.exists():
            raise InputError(f"{self.path}: key file {entry.key} of {entry.name} does not exist")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        if not server_side:
            ctx.check_hostname = False
        try:
            ctx.load_cert_chain(str(entry.cert), str(entry.key))
        except (ssl.SSLError, OSError) as exc:
            raise InputError(f"{self.path}: cannot load {entry.name}'s certificate and key: {exc}") from None
        try:
            ctx.load_verify_locations(cafile=str(self.ca))
        except (ssl.SSLError, OSError) as exc:
            raise InputError(f"{self.path}: cannot load the CA certificate {self.ca}: {exc}") from None
        if server_side:
            ctx.num_tickets = 0
        return ctx


def fingerprint_of_pem(data: bytes) -> str:
    """SHA-256 fingerprint (hex) of the DER form of a PEM certificate: what peers pin."""
    return x509.load_pem_x509_certificate(data).fingerprint(hashes.SHA256()).hex()


def _fingerprint(path: Path, where: str) -> str:
    """:func:`fingerprint_of_pem` of the certificate file at ``path`` (one clear error if unreadable)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{where}: cannot read certificate {path}: {exc.strerror}") from None
    try:
        return fingerprint_of_pem(data)
    except ValueError:
        raise InputError(f"{where}: {path} is not a PEM certificate") from None


def _entry(doc: Mapping[str, Any], party: int, base: Path, where: str) -> PartyEntry:
    name = party_name(party)
    sec = doc.get(name)
    if not isinstance(sec, dict):
        raise InputError(f"{where}: missing section [{name}]")
    allowed = {"host", "port", "cert", "key", "bind"}
    extra = set(sec) - allowed
    if extra:
        raise InputError(f"{where}: unknown key(s) {', '.join(sorted(extra))} in [{name}]")

    def path_of(key: str, required: bool) -> Path | None:
        v = sec.get(key)
        if v is None:
            if required:
                raise InputError(f"{where}: [{name}] needs '{key}'")
            return None
        if not isinstance(v, str) or not v:
            raise InputError(f"{where}: [{name}] {key} must be a file name")
        p = Path(v)
        return p if p.is_absolute() else base / p

    cert = path_of("cert", True)
    assert cert is not None
    if not cert.exists():
        raise InputError(f"{where}: certificate {cert} of {name} does not exist")
    host = sec.get("host")
    port = sec.get("port")
    bind = sec.get("bind")
    if party < CLIENT:
        if not isinstance(host, str) or not host:
            raise InputError(f"{where}: [{name}] needs a 'host' (the address the other parties dial)")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise InputError(f"{where}: [{name}] port must be an integer in 1..65535, got {port!r}")
        if bind is not None and not isinstance(bind, str):
            raise InputError(f"{where}: [{name}] bind must be an address")
    return PartyEntry(party, host, port, cert, path_of("key", False), bind, _fingerprint(cert, where))


def load_config(path: str | os.PathLike) -> PartiesConfig:
    """Read and check ``parties.toml``; raises :class:`InputError` naming the problem."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"configuration {p} does not exist")
    try:
        doc = tomllib.loads(p.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: cannot read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{p}: not valid TOML ({exc})") from None
    where = str(p)
    base = p.resolve().parent
    known = {"ca", "plan_hash", "timeout", "clients", "revoked", *PARTY_NAMES}
    extra = set(doc) - known
    if extra:
        raise InputError(f"{where}: unknown entries {', '.join(sorted(extra))} (expected {', '.join(sorted(known))})")
    ca = doc.get("ca")
    if not isinstance(ca, str) or not ca:
        raise InputError(f"{where}: needs 'ca' = the CA certificate file")
    ca_path = Path(ca) if Path(ca).is_absolute() else base / ca
    if not ca_path.exists():
        raise InputError(f"{where}: CA certificate {ca_path} does not exist")
    parties = {i: _entry(doc, i, base, where) for i in range(4)}
    seen: dict[str, str] = {}
    for e in parties.values():
        if e.fingerprint in seen:
            raise InputError(f"{where}: {seen[e.fingerprint]} and {e.name} use the same certificate")
        seen[e.fingerprint] = e.name
    addresses: dict[tuple, str] = {}
    for i in range(3):
        e = parties[i]
        key = (e.host, e.port)
        if key in addresses:
            raise InputError(f"{where}: {addresses[key]} and {e.name} both use {e.address}")
        addresses[key] = e.name
    plan_hash = doc.get("plan_hash")
    if plan_hash is not None and not isinstance(plan_hash, str):
        raise InputError(f"{where}: plan_hash must be a string")
    timeout = doc.get("timeout")
    if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0):
        raise InputError(f"{where}: timeout must be a positive number of seconds")
    clients_doc = doc.get("clients", {})
    if not isinstance(clients_doc, dict):
        raise InputError(f"{where}: [clients] must be a table of name = certificate file")
    clients: dict[str, str] = {}
    for name, cert in clients_doc.items():
        if not isinstance(cert, str) or not cert:
            raise InputError(f"{where}: [clients] {name} must be a certificate file name")
        cp = Path(cert) if Path(cert).is_absolute() else base / cert
        if not cp.exists():
            raise InputError(f"{where}: certificate {cp} of client {name!r} does not exist")
        clients[name] = _fingerprint(cp, where)
        if clients[name] in seen and seen[clients[name]] != "client":
            raise InputError(f"{where}: client {name!r} uses {seen[clients[name]]}'s certificate")
    revoked = doc.get("revoked", [])
    if not isinstance(revoked, list) or not all(isinstance(r, str) and len(r) == 64 for r in revoked):
        raise InputError(f"{where}: revoked must be a list of SHA-256 fingerprints (64 hex digits)")
    return PartiesConfig(p, ca_path, parties, plan_hash, float(timeout) if timeout is not None else None,
                         clients, frozenset(r.lower() for r in revoked))


def render_config(
    servers: Mapping[str, tuple[str, int]],
    cert_dir: str | os.PathLike = ".",
    *,
    with_keys: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """The text of a ``parties.toml`` for ``servers`` = {"P0": (host, port), ...} with the
    certificates named as :func:`siguard.runtime.net.certs.make_certs` names them, in ``cert_dir``."""
    d = Path(cert_dir)

    def q(v: Any) -> str:
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return str(v)

    lines = [
        "# SIGuard parties: host, port and certificate of each party (paths relative to this file).",
        "# A party needs its own 'key' only (in its own directory): give each host only its directory.",
        f"ca = {q(str(d / 'ca.pem'))}",
    ]
    for k, v in (extra or {}).items():
        lines.append(f"{k} = {q(v)}")
    for role in ("P0", "P1", "P2"):
        host, port = servers[role]
        lines += ["", f"[{role}]", f"host = {q(host)}", f"port = {int(port)}", f"cert = {q(str(d / (role + '.pem')))}"]
        if with_keys:
            lines.append(f"key = {q(str(d / role / (role + '.key')))}")
    lines += ["", "[client]", f"cert = {q(str(d / 'client.pem'))}"]
    if with_keys:
        lines.append(f"key = {q(str(d / 'client' / 'client.key'))}")
    return "\n".join(lines) + "\n"
