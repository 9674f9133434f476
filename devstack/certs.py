"""Test certificates made at test time: a CA, server certificates and client certificates.

Nothing is committed: each ``TestPKI`` makes a fresh CA (EC P-256, valid one day) in its own
directory, then issues leaf certificates signed by it, as PEM files that servers (Redis' TLS port,
the proxy, nginx) and clients (``ssl.create_default_context(cafile=...)``, httpx ``verify=``,
redis-py ``ssl_ca_certs=``) read. Uses ``cryptography`` (in the venv through joserfc).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class CertPair:
    """A leaf certificate and its private key (PEM files; the key is 0600)."""

    cert: Path
    key: Path

    @property
    def chain(self) -> Path:
        """Certificate followed by the CA's certificate (for servers that want the chain in one file)."""
        return self.cert.with_name(self.cert.stem + "-chain.pem")


class TestPKI:
    """A throwaway certificate authority under ``directory`` (created if needed)."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, directory: Path, *, name: str = "slurmproxy devstack test CA", days: int = 1) -> None:
        self.directory = directory
        self.days = days
        directory.mkdir(parents=True, exist_ok=True)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._ca_name = subject
        self._ca_cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._ca_key.public_key()), critical=False)
            .sign(self._ca_key, hashes.SHA256())
        )
        self.ca_cert = directory / "ca.pem"
        self.ca_cert.write_bytes(self._ca_cert.public_bytes(serialization.Encoding.PEM))
        self.ca_key = directory / "ca-key.pem"
        _write_key(self.ca_key, self._ca_key)

    def server(self, name: str = "server", hosts: tuple[str, ...] = DEFAULT_HOSTS) -> CertPair:
        """A server certificate for ``hosts`` (IP addresses and DNS names in subjectAltName)."""
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        return self._issue(name, hosts[0] if hosts else name, sans, ExtendedKeyUsageOID.SERVER_AUTH)

    def client(self, common_name: str, name: str | None = None) -> CertPair:
        """A client certificate with subject CN ``common_name`` (for mutual TLS)."""
        return self._issue(name or f"client-{common_name}", common_name, [], ExtendedKeyUsageOID.CLIENT_AUTH)

    def _issue(
        self, name: str, common_name: str, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier
    ) -> CertPair:
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=self.days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._ca_key, hashes.SHA256())
        pair = CertPair(self.directory / f"{name}.pem", self.directory / f"{name}-key.pem")
        pem = cert.public_bytes(serialization.Encoding.PEM)
        pair.cert.write_bytes(pem)
        pair.chain.write_bytes(pem + self.ca_cert.read_bytes())
        _write_key(pair.key, key)
        return pair


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    path.chmod(0o600)
