"""Self-signed application instance certificates, for commissioning, the tests and the benchmark: a real line
uses the plant's own (or at least one made once and kept, since clients pin the server's certificate)."""

from __future__ import annotations

import socket
from pathlib import Path

from asyncua.crypto import cert_gen
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID


def self_signed(folder: Path, name: str, application_uri: str, server: bool) -> tuple[Path, Path]:
    """``folder/<name>.der`` (certificate, subjectAltName ``application_uri`` and this host's name) and
    ``folder/<name>.pem`` (its unencrypted key), for a server or a client application."""
    key = cert_gen.generate_private_key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = cert_gen.generate_self_signed_app_certificate(
        key, name, {}, [x509.UniformResourceIdentifier(application_uri), x509.DNSName(socket.gethostname())], [usage])
    cert_path, key_path = folder / f"{name}.der", folder / f"{name}.pem"
    cert_path.write_bytes(cert.public_bytes(Encoding.DER))
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return cert_path, key_path
