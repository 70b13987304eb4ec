"""The site CA and server certificates of `cfs.tls` (files only; no server)."""

from __future__ import annotations

import ipaddress
import ssl
import stat
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from cfs.tls import (
    ca_for,
    client_context,
    ensure_ca,
    ensure_server_cert,
    render_tls_block,
    server_tls,
    subject_names,
)


def test_subject_names_are_ip_sans_for_addresses_and_dns_for_names() -> None:
    names = subject_names(["127.0.0.1", "localhost", "::1", "127.0.0.1"])
    assert names == [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]


def test_a_server_certificate_is_signed_by_the_site_ca_for_its_hosts(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    paths = ensure_server_cert(creds, "s", "n1", ["127.0.0.1", "nats-1.example"])
    for key in (creds / "tls" / "ca.key", paths.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((creds / "tls").stat().st_mode) == 0o700
    cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    ca = x509.load_pem_x509_certificate(paths.ca.read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert "nats-1.example" in sans.get_values_for_type(x509.DNSName)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usage)
    # kept: a second call changes nothing (servers and clients keep trusting it)
    again = ensure_server_cert(creds, "s", "n1")
    assert again == paths and again.cert.read_bytes() == paths.cert.read_bytes()
    assert ensure_ca(creds, "s") == paths.ca
    assert server_tls(creds, "n2").cert.name == "server-n2.pem"


def test_clients_find_the_ca_beside_their_credentials(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    assert ca_for(creds / "client.nk") is None and ca_for(None) is None
    ensure_ca(creds, "s")
    assert ca_for(creds / "client.nk") == creds / "tls" / "ca.pem"
    context = client_context(creds / "tls" / "ca.pem")
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname


def test_the_nats_tls_block(tmp_path: Path) -> None:
    block = render_tls_block(server_tls(tmp_path, "n1"), "  ", verify=True)
    assert block[0] == "  tls {" and block[-1] == "  }"
    assert any("verify: true" in line for line in block)
    assert any(line.strip().startswith("cert_file:") and "server-n1.pem" in line for line in block)
    assert not any("verify" in line for line in render_tls_block(server_tls(tmp_path, "n1")))
