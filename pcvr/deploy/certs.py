"""Certificates and keys for a deployment: TLS on every Flower connection, SuperNode authentication.

``pcvr certs`` makes, under one directory (see :class:`CertLayout`):

* a certificate authority (``ca.pem``, ``ca.key``) — the platform's, the one every
  clean room's SuperNode trusts through ``--root-certificates``;
* the SuperLink's certificate and key (``superlink.pem``, ``superlink.key``), issued
  by that CA for every host name and IP address the parties reach it by (flwr 1.41's
  SuperLink also dials its own ServerApp executor at 127.0.0.1, so a deployment
  needs that address in the list);
* one SECP384R1 key pair per clean room in OpenSSH format
  (``clean_room_K/supernode.key``, ``clean_room_K/supernode.pub``): the private key
  stays with the clean room (``flower-supernode --auth-supernode-private-key``), the
  public key is what the platform registers (``flwr supernode register``).

Private files are written with mode 0600. Nothing that exists is ever replaced:
a re-run keeps every key and certificate it finds, makes only what is missing,
and stops with an error naming the file when what it finds does not fit (a
certificate not issued by the CA, one missing a requested host, half a pair).
To replace a key, delete it first.

On two hosts the platform runs ``pcvr certs --out DIR --hosts ... --clean-rooms 0``
and hands ``ca.pem`` to each clean room; each clean room runs
``pcvr certs --out DIR --clean-rooms 1`` (no ``--hosts``: no CA) on its own host
and hands the platform only its ``supernode.pub``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertError", "CertLayout", "CertsReport", "make_certs", "parse_hosts"]

CA_DAYS = 3650
SERVER_DAYS = 825  # the longest lifetime current TLS clients accept for a server certificate
_CURVE = ec.SECP384R1
_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


class CertError(ValueError):
    """A certificate or key on disk that cannot be used or kept; the message names the file."""


@dataclass(frozen=True)
class CertLayout:
    """Where ``pcvr certs`` puts each file, and where every reader finds it."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def superlink_cert(self) -> Path:
        return self.root / "superlink.pem"

    @property
    def superlink_key(self) -> Path:
        return self.root / "superlink.key"

    def node_private_key(self, clean_room_id: int) -> Path:
        return self.root / f"clean_room_{clean_room_id}" / "supernode.key"

    def node_public_key(self, clean_room_id: int) -> Path:
        return self.root / f"clean_room_{clean_room_id}" / "supernode.pub"


@dataclass(frozen=True)
class CertsReport:
    """What one ``make_certs`` call made and what it kept, as paths."""

    created: tuple[Path, ...]
    kept: tuple[Path, ...]


def parse_hosts(text: str) -> tuple[str, ...]:
    """``"127.0.0.1,localhost,superlink"`` → its names, each checked as an IP address or a DNS name."""
    hosts = tuple(name.strip() for name in text.split(",") if name.strip())
    for name in hosts:
        if not _is_ip(name) and not _HOST.match(name):
            raise ValueError(f"--hosts: {name!r} is neither an IP address nor a DNS host name")
    if len(set(hosts)) != len(hosts):
        raise ValueError(f"--hosts: names repeat in {text!r}")
    return hosts


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName(
        [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts]
    )


def _write_new(path: Path, data: bytes, *, private: bool) -> None:
    """Write ``path`` whole or not at all, and never over an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(staging, path)  # fails if path exists: nothing is overwritten
    finally:
        staging.unlink(missing_ok=True)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CertError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{path}: not an elliptic-curve key")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise CertError(f"{path}: not a PEM certificate ({exc})") from None


def _same_public_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)


def _both_or_neither(first: Path, second: Path) -> bool:
    """True when both exist, False when neither; half a pair is an error."""
    if first.exists() != second.exists():
        present, missing = (first, second) if first.exists() else (second, first)
        raise CertError(f"{present}: found without {missing.name}; delete it to make a new pair")
    return first.exists()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _ca(layout: CertLayout, made: list[Path], kept: list[Path]) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if _both_or_neither(layout.ca_cert, layout.ca_key):
        cert, key = _load_cert(layout.ca_cert), _load_key(layout.ca_key)
        if not _same_public_key(cert, key):
            raise CertError(f"{layout.ca_key}: does not belong to {layout.ca_cert}")
        kept += [layout.ca_cert, layout.ca_key]
        return cert, key
    key = ec.generate_private_key(_CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pcvr platform CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write_new(layout.ca_key, _pem_key(key), private=True)
    _write_new(layout.ca_cert, _pem_cert(cert), private=False)
    made += [layout.ca_cert, layout.ca_key]
    return cert, key


def _server(
    layout: CertLayout, hosts: Sequence[str], ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
    made: list[Path], kept: list[Path],
) -> None:
    if _both_or_neither(layout.superlink_cert, layout.superlink_key):
        cert, key = _load_cert(layout.superlink_cert), _load_key(layout.superlink_key)
        if not _same_public_key(cert, key):
            raise CertError(f"{layout.superlink_key}: does not belong to {layout.superlink_cert}")
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            raise CertError(f"{layout.superlink_cert}: not issued by {layout.ca_cert}; delete it to issue a new one") from None
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))
        missing = [h for h in hosts if (str(ipaddress.ip_address(h)) if _is_ip(h) else h) not in names]
        if missing:
            raise CertError(
                f"{layout.superlink_cert}: issued for {sorted(names)}, not for {', '.join(missing)}; "
                "delete it (and superlink.key) to issue one for --hosts"
            )
        kept += [layout.superlink_cert, layout.superlink_key]
        return
    key = ec.generate_private_key(_CURVE())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write_new(layout.superlink_key, _pem_key(key), private=True)
    _write_new(layout.superlink_cert, _pem_cert(cert), private=False)
    made += [layout.superlink_cert, layout.superlink_key]


def _node_key(layout: CertLayout, clean_room_id: int, made: list[Path], kept: list[Path]) -> None:
    private, public = layout.node_private_key(clean_room_id), layout.node_public_key(clean_room_id)
    if private.exists():
        try:
            key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise CertError(f"{private}: not an unencrypted OpenSSH private key ({exc})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertError(f"{private}: not an elliptic-curve key (SuperNode auth needs one)")
        derived = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        if public.exists():
            if public.read_bytes().split()[:2] != derived.split()[:2]:
                raise CertError(f"{public}: does not belong to {private}")
            kept += [private, public]
        else:
            _write_new(public, derived + b"\n", private=False)
            kept.append(private)
            made.append(public)
        return
    if public.exists():
        raise CertError(f"{public}: found without supernode.key; delete it to make a new pair")
    key = ec.generate_private_key(_CURVE())
    _write_new(
        private,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
        private=True,
    )
    _write_new(
        public,
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n",
        private=False,
    )
    made += [private, public]


def make_certs(out: Path, *, hosts: Sequence[str], clean_rooms: int) -> CertsReport:
    """Make what is missing under ``out``: the CA and SuperLink pair when ``hosts`` is given, and ``clean_rooms`` node keys.

    Raises:
        ValueError: on a negative ``clean_rooms`` or nothing to make.
        CertError: when a file that exists cannot be kept as it is.
    """
    if clean_rooms < 0:
        raise ValueError(f"--clean-rooms must be >= 0; got {clean_rooms}")
    if not hosts and clean_rooms == 0:
        raise ValueError("nothing to make: give --hosts (the CA and SuperLink certificate) and/or --clean-rooms N")
    layout = CertLayout(Path(out))
    if layout.root.exists() and not layout.root.is_dir():
        raise CertError(f"{layout.root}: exists and is not a directory")
    made: list[Path] = []
    kept: list[Path] = []
    if hosts:
        ca_cert, ca_key = _ca(layout, made, kept)
        _server(layout, hosts, ca_cert, ca_key, made, kept)
    for k in range(clean_rooms):
        _node_key(layout, k, made, kept)
    return CertsReport(created=tuple(made), kept=tuple(kept))
