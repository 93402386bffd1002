"""A throwaway PKI for the TLS tests: one CA, server and client certificates, PEM files.

Made with the `cryptography` package, so the tests need no network and no
fixed files: every run has its own CA, and nothing outside it trusts it.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key(kind: str):
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "forkgw tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class Pki:
    def __init__(self, folder: Path, ca_name: str = "forkgw test CA"):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.ca_key = _key("ec")
        now = datetime.datetime.now(datetime.timezone.utc)
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name(ca_name)).issuer_name(_name(ca_name))
            .public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca = self._write("ca.pem", self.ca_cert.public_bytes(serialization.Encoding.PEM))

    def _write(self, name: str, data: bytes) -> Path:
        path = self.folder / name
        path.write_bytes(data)
        return path

    def issue(self, name: str, sans: list[str] | None = None, kind: str = "ec", client: bool = False,
              password: bytes | None = None) -> tuple[Path, Path]:
        """A certificate for `name` (and `sans`) signed by the CA: (cert.pem, key.pem)."""
        key = _key(kind)
        now = datetime.datetime.now(datetime.timezone.utc)
        alt = []
        for san in sans if sans is not None else [name]:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                alt.append(x509.DNSName(san))
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(self.ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        encryption = (serialization.BestAvailableEncryption(password) if password
                      else serialization.NoEncryption())
        stem = f"{name}.{kind}"
        cert_path = self._write(f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM))
        key_path = self._write(f"{stem}.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
        return cert_path, key_path
