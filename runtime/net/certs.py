"""Certificates for the networked runtime: a local CA and one certificate per party and the client.

``siguard certs --out DIR`` calls :func:`make_certs`. It writes

* ``ca.pem`` (the CA certificate every party trusts) and ``ca.key`` (the CA's private key, only
  needed to issue more certificates: keep it offline);
* ``P0.pem``, ``P1.pem``, ``P2.pem``, ``client.pem`` (certificates: public), and each party's private
  key in that party's own directory: ``P0/P0.key``, ``P1/P1.key``, ``P2/P2.key``, ``client/client.key``
  (directories 0700), so that handing a party its directory hands it its key and no other;
* ``parties.toml``, a configuration naming each party's host, port and certificate
  (see :mod:`siguard.runtime.net.config`), unless one exists.

Keys are ECDSA P-256, signatures SHA-256, private keys PKCS#8 PEM without a passphrase, written
with mode 0600. Every leaf certificate is valid for TLS server *and* client authentication
(servers both accept and dial connections) and names its role twice: the subject common name
``siguard P1`` and the URI ``urn:siguard:party:P1``. Identity is nevertheless decided by
pinning: :mod:`siguard.runtime.net.config` records the SHA-256 fingerprint of every configured certificate,
and a peer is whichever party's certificate it presented, verified against the CA.

Existing files are never overwritten unless ``force`` is given, so nothing written before is lost.

Signing requests. A party that wants its key never to leave its host runs :func:`make_request`
(``siguard certs --out DIR --request NAME``): a fresh key in ``DIR/NAME.key`` and a request
``DIR/NAME.csr``. The CA's operator runs :func:`sign_request` (``siguard certs --out CA_DIR --sign
NAME.csr``), which checks the request's signature and issues ``NAME.pem`` for the role NAME
(P0, P1, P2, or a client's name, which then goes under ``[clients]`` in parties.toml). The CA
decides the role and validity; only the public key and the addresses come from the request.
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

__all__ = ["ROLES", "make_certs", "issue_certificate", "make_request", "sign_request", "key_path"]
from .config import render_config

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


def key_path(directory: str | os.PathLike, role: str) -> Path:
    """Where :func:`make_certs` writes ``role``'s private key: its own directory, ``DIR/ROLE/ROLE.key``."""
    return Path(directory) / role / f"{role}.key"


def issue_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    role: str,
    names: Sequence[str] = _DEFAULT_NAMES,
    days: int = 365,
    public_key: ec.EllipticCurvePublicKey | None = None,
) -> tuple[ec.EllipticCurvePrivateKey | None, x509.Certificate]:
    """A certificate for ``role`` signed by the CA (server and client auth), for ``public_key`` (from a
    signing request; the returned key is then None) or for a fresh key."""
    key = _key() if public_key is None else None
    public_key = key.public_key() if key is not None else public_key
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"siguard {role}")]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
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
    targets = [d / "ca.pem", d / "ca.key"] + [d / f"{r}.pem" for r in ROLES] + [key_path(d, r) for r in ROLES]
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
        assert key is not None
        _write(d / f"{role}.pem", cert.public_bytes(pem), False, force)
        _private_dir(d / role)
        _write(key_path(d, role), _key_pem(key), True, force)
        written[role], written[f"{role}_key"] = d / f"{role}.pem", key_path(d, role)
    config = d / "parties.toml"
    if write_config and (force or not config.exists()):

        servers = {r: (hosts.get(r, "127.0.0.1"), port_base + i) for i, r in enumerate(ROLES[:3])}
        config.write_text(render_config(servers, cert_dir=".", with_keys=True))
        written["config"] = config
    return written


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _check_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_" for c in name) or len(name) > 64:
        raise InputError(f"certificate name {name!r}: use letters, digits, '-' and '_' (at most 64)")


def make_request(out: str | os.PathLike, name: str, names: Sequence[str] = (), *,
                 force: bool = False) -> dict[str, Path]:
    """A fresh private key ``out/NAME.key`` (0600) and a signing request ``out/NAME.csr`` for role NAME,
    with ``names`` (addresses) as subject alternative names. Returns {"key": ..., "csr": ...}."""
    _check_name(name)
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    key = _key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"siguard {name}")]))
        .add_extension(_san(list(_DEFAULT_NAMES) + list(names), name), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(d / f"{name}.key", _key_pem(key), True, force)
    _write(d / f"{name}.csr", csr.public_bytes(serialization.Encoding.PEM), False, force)
    return {"key": d / f"{name}.key", "csr": d / f"{name}.csr"}


def sign_request(ca_dir: str | os.PathLike, csr_path: str | os.PathLike, name: str | None = None, *,
                 days: int = 365, force: bool = False) -> Path:
    """Issue ``CA_DIR/NAME.pem`` for the request at ``csr_path`` with the CA in ``ca_dir`` (``ca.pem``,
    ``ca.key``). NAME defaults to the request's file name; the request's signature must verify.
    The role in the certificate is NAME (the CA's choice), not what the request asks for."""
    d, csr_file = Path(ca_dir), Path(csr_path)
    name = name or csr_file.stem
    _check_name(name)
    try:
        ca_cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
        ca_key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise InputError(f"{d}: needs the CA's ca.pem and ca.key ({exc})") from None
    try:
        csr = x509.load_pem_x509_csr(csr_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise InputError(f"{csr_file}: not a PEM certificate signing request ({exc})") from None
    if not csr.is_signature_valid:
        raise InputError(f"{csr_file}: the request's signature does not verify")
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise InputError(f"{csr_file}: expected an ECDSA (P-256) key")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(v) for v in san.get_values_for_type(x509.DNSName)]
        names += [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = list(_DEFAULT_NAMES)
    _, cert = issue_certificate(ca_key, ca_cert, name, names, days, public_key=public)
    out = d / f"{name}.pem"
    _write(out, cert.public_bytes(serialization.Encoding.PEM), False, force)
    return out
