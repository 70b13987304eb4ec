"""TLS for every NATS connection (DESIGN.md §10): a site CA and a certificate per server.

`cfs cluster init` (and `cfs dev`, through `LocalSite`) writes them under the
credentials directory, `tls/`:

    ca.pem                  the site CA (public: every client verifies the servers with it)
    ca.key                  its private key (0600: only to issue certificates)
    server-<name>.pem/.key  one per nats-server (key 0600)

A server certificate names its host in subjectAltName (an IP address as an IP SAN, so
the hostname check works on 127.0.0.1) and serves both ends of a connection: clients
and leaf nodes verify it as a server, and cluster routes, which nats-server always
verifies both ways, present it as a client certificate.

Clients find the CA next to their credentials file (`ca_for`), so a site configured for
TLS is used over TLS without another setting. Authentication stays the NKeys'
(`cfs.security`); TLS adds confidentiality and server authentication.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TLS_DIR = "tls"
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
_CA_DAYS = 3650
_SERVER_DAYS = 825


@dataclass(frozen=True)
class ServerTls:
    """The files a nats-server's `tls {}` blocks name."""

    cert: Path
    key: Path
    ca: Path


def tls_dir(credentials_dir: Path) -> Path:
    return Path(credentials_dir) / TLS_DIR


def ca_path(credentials_dir: Path) -> Path:
    return tls_dir(credentials_dir) / CA_CERT


def server_tls(credentials_dir: Path, server: str) -> ServerTls:
    """Where server `server`'s certificate and key are (made by `ensure_server_cert`)."""
    directory = tls_dir(credentials_dir)
    return ServerTls(
        cert=directory / f"server-{server}.pem",
        key=directory / f"server-{server}.key",
        ca=directory / CA_CERT,
    )


def ca_for(credentials: Path | None) -> Path | None:
    """The site CA beside a credentials file (`<dir>/tls/ca.pem`), if the site has one."""
    if credentials is None:
        return None
    found = ca_path(Path(credentials).parent)
    return found if found.exists() else None


def client_context(ca: Path) -> ssl.SSLContext:
    """Verify the server against the site CA only, hostname included (IP SANs)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


# -- generation ------------------------------------------------------------------------
def ensure_ca(credentials_dir: Path, site: str) -> Path:
    """Create the site CA unless it exists (kept: every issued certificate depends on it)."""
    directory = tls_dir(credentials_dir)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if cert_path.exists() and key_path.exists():
        return cert_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"ClaudeFS CA {site}")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_secret(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def ensure_server_cert(
    credentials_dir: Path, site: str, server: str, hosts: Sequence[str] = DEFAULT_HOSTS
) -> ServerTls:
    """A certificate for nats-server `server` on `hosts` (IPs and DNS names), signed by
    the site CA (made first if missing); an existing one is kept."""
    ensure_ca(credentials_dir, site)
    paths = server_tls(credentials_dir, server)
    if paths.cert.exists() and paths.key.exists():
        return paths
    directory = tls_dir(credentials_dir)
    ca_key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{directory / CA_KEY} is not the EC key cfs made")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(subject_names(hosts)), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_secret(paths.key, _key_pem(key))
    _write_public(paths.cert, cert.public_bytes(serialization.Encoding.PEM))
    return paths


def subject_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """IP SANs for addresses, DNS SANs for names (pure)."""
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def render_tls_block(tls: ServerTls, indent: str = "", *, verify: bool = False) -> list[str]:
    """A nats-server `tls {}` block (pure). `verify`: require a client certificate."""
    return [
        f"{indent}tls {{",
        f"{indent}  cert_file: {_quoted(tls.cert)}",
        f"{indent}  key_file: {_quoted(tls.key)}",
        f"{indent}  ca_file: {_quoted(tls.ca)}",
        *([f"{indent}  verify: true"] if verify else []),
        f"{indent}  timeout: 5",
        f"{indent}}}",
    ]


def _quoted(path: Path) -> str:
    import json

    return json.dumps(str(path))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_secret(path: Path, data: bytes) -> None:
    """0600 from the start (a temporary file renamed over: never readable by others)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
