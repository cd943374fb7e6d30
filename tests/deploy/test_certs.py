"""pcvr certs: a CA, the SuperLink's certificate, SuperNode keys Flower accepts, and nothing overwritten."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

from pcvr.cli import main
from pcvr.deploy.certs import CertError, CertLayout, make_certs, parse_hosts

HOSTS = ("127.0.0.1", "localhost", "superlink")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    report = make_certs(out, hosts=HOSTS, clean_rooms=2)
    return CertLayout(out), report


def _snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_makes_every_file_with_private_ones_0600(certs):
    layout, report = certs
    expected = {
        layout.ca_cert, layout.ca_key, layout.superlink_cert, layout.superlink_key,
        *(layout.node_private_key(k) for k in range(2)), *(layout.node_public_key(k) for k in range(2)),
    }
    assert set(report.created) == expected and report.kept == ()
    for private in (layout.ca_key, layout.superlink_key, layout.node_private_key(0), layout.node_private_key(1)):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    assert stat.S_IMODE(layout.ca_cert.stat().st_mode) & 0o077 == 0o044
    assert not list(layout.root.rglob(".*.tmp"))


def test_superlink_certificate_is_issued_by_the_ca_for_every_host(certs):
    layout, _ = certs
    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(layout.superlink_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "superlink"]


def test_node_keys_are_secp384r1_openssh_pairs_that_flower_loads(certs):
    layout, _ = certs
    publics = set()
    for k in range(2):
        private = serialization.load_ssh_private_key(layout.node_private_key(k).read_bytes(), password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
        public_bytes = try_load_public_key(layout.node_public_key(k))  # what `flwr supernode register` reads
        public = serialization.load_ssh_public_key(layout.node_public_key(k).read_bytes())
        assert uses_nist_ec_curve(public)
        assert public.public_numbers() == private.public_key().public_numbers()
        publics.add(public_bytes)
    assert len(publics) == 2


def _tls_handshake(layout, trusted_ca: bytes, server_name: str) -> bool:
    """A real TLS handshake on loopback with Python's ssl, which both ends of Flower's HTTP transport use
    (uvicorn serves the SuperLink, httpx connects the SuperNodes and the CLI)."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(layout.superlink_cert, layout.superlink_key)
    client_context = ssl.create_default_context(cadata=trusted_ca.decode())
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with client_context.wrap_socket(raw, server_hostname=server_name):
                    return True
        except ssl.SSLCertVerificationError:
            return False
        finally:
            thread.join(timeout=10)


def test_tls_handshake_succeeds_with_the_ca_and_fails_with_another(certs, tmp_path):
    layout, _ = certs
    assert _tls_handshake(layout, layout.ca_cert.read_bytes(), "127.0.0.1")
    assert _tls_handshake(layout, layout.ca_cert.read_bytes(), "superlink")
    assert not _tls_handshake(layout, layout.ca_cert.read_bytes(), "elsewhere.example")  # name not in the certificate
    other = CertLayout(tmp_path / "other")
    make_certs(other.root, hosts=HOSTS, clean_rooms=0)
    assert not _tls_handshake(layout, other.ca_cert.read_bytes(), "127.0.0.1")  # control: another CA is refused


def test_rerun_keeps_every_file_byte_for_byte_and_adds_what_is_missing(tmp_path):
    make_certs(tmp_path, hosts=HOSTS, clean_rooms=2)
    before = _snapshot(tmp_path)
    report = make_certs(tmp_path, hosts=HOSTS, clean_rooms=3)
    after = _snapshot(tmp_path)
    assert {p: after[p] for p in before} == before
    layout = CertLayout(tmp_path)
    assert set(report.created) == {layout.node_private_key(2), layout.node_public_key(2)}
    assert layout.node_private_key(0) in report.kept


def test_a_deleted_public_key_is_derived_again_from_its_private_key(tmp_path):
    layout = CertLayout(tmp_path)
    make_certs(tmp_path, hosts=(), clean_rooms=1)
    public = layout.node_public_key(0).read_bytes()
    layout.node_public_key(0).unlink()
    report = make_certs(tmp_path, hosts=(), clean_rooms=1)
    assert layout.node_public_key(0).read_bytes() == public and report.created == (layout.node_public_key(0),)
    assert not layout.ca_cert.exists()  # a clean room's host makes no CA


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda l: l.ca_key.unlink(), "ca.pem: found without ca.key"),
        (lambda l: l.superlink_cert.unlink(), "superlink.key: found without superlink.pem"),
        (lambda l: l.node_private_key(0).unlink(), "supernode.pub: found without supernode.key"),
        (lambda l: l.superlink_key.write_bytes(b"garbage"), "superlink.key: not an unencrypted PEM private key"),
        (lambda l: l.node_private_key(1).write_bytes(b"garbage"), "supernode.key: not an unencrypted OpenSSH private key"),
        (
            lambda l: l.node_public_key(0).write_bytes(l.node_public_key(1).read_bytes()),
            "clean_room_0/supernode.pub: does not belong to",
        ),
    ],
)
def test_what_cannot_be_kept_is_an_error_naming_the_file(tmp_path, break_it, message):
    layout = CertLayout(tmp_path)
    make_certs(tmp_path, hosts=HOSTS, clean_rooms=2)
    break_it(layout)
    before = _snapshot(tmp_path)
    with pytest.raises(CertError, match=message):
        make_certs(tmp_path, hosts=HOSTS, clean_rooms=2)
    assert _snapshot(tmp_path) == before


def test_a_server_certificate_from_another_ca_or_for_other_hosts_is_refused(tmp_path):
    layout = CertLayout(tmp_path)
    make_certs(tmp_path, hosts=HOSTS, clean_rooms=0)
    with pytest.raises(CertError, match="superlink.pem: issued for .* not for 10.0.0.7"):
        make_certs(tmp_path, hosts=(*HOSTS, "10.0.0.7"), clean_rooms=0)
    other = CertLayout(tmp_path / "other")
    make_certs(other.root, hosts=HOSTS, clean_rooms=0)
    layout.superlink_cert.unlink()
    layout.superlink_key.unlink()
    layout.superlink_cert.write_bytes(other.superlink_cert.read_bytes())
    layout.superlink_key.write_bytes(other.superlink_key.read_bytes())
    with pytest.raises(CertError, match="superlink.pem: not issued by"):
        make_certs(tmp_path, hosts=HOSTS, clean_rooms=0)


@pytest.mark.parametrize("text", ["127.0.0.1,bad_name", "a..b", "127.0.0.1,127.0.0.1"])
def test_bad_hosts_are_refused(text):
    with pytest.raises(ValueError, match="--hosts"):
        parse_hosts(text)


def test_cli_prints_what_it_made_and_one_line_on_error(tmp_path, capsys):
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--hosts", "127.0.0.1,localhost", "--clean-rooms", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("created ") for line in printed) == 6
    assert main(["certs", "--out", str(out), "--clean-rooms", "1"]) == 0
    assert all(line.startswith("kept ") for line in capsys.readouterr().out.splitlines())
    assert main(["certs", "--out", str(out), "--clean-rooms", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pcvr: error: nothing to make: give --hosts (the CA and SuperLink certificate) and/or --clean-rooms N"]
