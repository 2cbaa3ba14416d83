"""Certificates for the networked runtime: a local CA and one certificate per party and the client.

``siguard certs --out DIR`` calls :func:`make_certs`. It writes

* ``ca.pem`` (the CA certificate every party trusts) and ``ca.key`` (the CA's private key, only
  needed to issue more certificates: keep it offline);
* ``P0.pem``/``P0.key``, ``P1.pem``/``P1.key``, ``P2.pem``/``P2.key``, ``client.pem``/``client.key``;
* ``parties.toml``, a configuration naming each party's host, port and certificate
  (see :mod:`siguard.runtime.net.config`), unless one exists.

Keys are ECDSA P-256, signatures SHA-256, private keys PKCS#8 PEM without a passphrase, written
with mode 0600. Every leaf certificate is valid for TLS server *and* client authentication
(servers both accept and dial connections) and names its role twice: the subject common name
``siguard P1`` and the URI ``urn:siguard:party:P1``. Identity is nevertheless decided by
pinning: :mod:`siguard.runtime.net.config` records the SHA-256 fingerprint of every configured certificate,
and a peer is whichever party's certificate it presented, verified against the CA.

Existing files are never overwritten unless ``force`` is given, so nothing written before is lost.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from siguard.core.errors import InputError

from .config import render_config

__all__ = ["ROLES", "make_certs", "issue_certificate"]

#: the four roles that get a certificate, in party order (0, 1, 2, client)
ROLES = ("P0", "P1", "P2", "client")

_DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, private: bool, force: bool) -> None:
    if path.exists() and not force:
        raise InputError(f"{path} exists; pass --force to replace it")
    if private:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, 0o600)
    else:
        path.write_bytes(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(names: Sequence[str], role: str) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = [x509.UniformResourceIdentifier(f"urn:siguard:party:{role}")]
    for name in dict.fromkeys(names):  # keep order, drop duplicates
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _key_usage(*allowed: str) -> x509.KeyUsage:
    """A KeyUsage extension allowing exactly the named usages."""
    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
             "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{n: n in allowed for n in names})


def _ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "siguard local CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage("key_cert_sign", "crl_sign"),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    role: str,
    names: Sequence[str] = _DEFAULT_NAMES,
    days: int = 365,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh key and a certificate for ``role`` signed by the CA (server and client auth)."""
    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"siguard {role}")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage("digital_signature", "key_agreement"),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(_san(names, role), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def make_certs(
    out: str | os.PathLike,
    hosts: Mapping[str, str] | None = None,
    *,
    port_base: int = 7400,
    days: int = 365,
    force: bool = False,
    write_config: bool = True,
) -> dict[str, Path]:
    """Create the CA and the four party certificates in ``out`` (see the module docstring).

    ``hosts`` maps a role ("P0", "P1", "P2", "client") to the address it is reached at; the
    address is added to that certificate's subject alternative names and, for the servers,
    written into ``parties.toml`` (default 127.0.0.1, ports ``port_base`` + i). Returns the paths
    written, by name ("ca", "ca_key", "P0", "P0_key", ..., "config").
    """
    hosts = dict(hosts or {})
    unknown = set(hosts) - set(ROLES)
    if unknown:
        raise InputError(f"unknown party name(s) {', '.join(sorted(unknown))}; expected {', '.join(ROLES)}")
    if not 1 <= port_base <= 65533:
        raise InputError(f"--port-base {port_base} leaves no room for three ports")
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    targets = [d / "ca.pem", d / "ca.key"] + [d / f"{r}.{ext}" for r in ROLES for ext in ("pem", "key")]
    if not force:
        for p in targets:
            if p.exists():
                raise InputError(f"{p} exists; pass --force to replace it")
    ca_key, ca_cert = _ca(days)
    pem = serialization.Encoding.PEM
    written: dict[str, Path] = {}
    _write(d / "ca.pem", ca_cert.public_bytes(pem), False, force)
    _write(d / "ca.key", _key_pem(ca_key), True, force)
    written["ca"], written["ca_key"] = d / "ca.pem", d / "ca.key"
    for role in ROLES:
        names = list(_DEFAULT_NAMES) + ([hosts[role]] if role in hosts else [])
        key, cert = issue_certificate(ca_key, ca_cert, role, names, days)
        _write(d / f"{role}.pem", cert.public_bytes(pem), False, force)
        _write(d / f"{role}.key", _key_pem(key), True, force)
        written[role], written[f"{role}_key"] = d / f"{role}.pem", d / f"{role}.key"
    config = d / "parties.toml"
    if write_config and (force or not config.exists()):

        servers = {r: (hosts.get(r, "127.0.0.1"), port_base + i) for i, r in enumerate(ROLES[:3])}
        config.write_text(render_config(servers, cert_dir=".", with_keys=True))
        written["config"] = config
    return written
