"""A local certificate authority, a SuperLink TLS certificate and SuperNode authentication keys.

For trying a deployed federation (on one machine or a test network). Layout of the output folder::

    ca.crt                  CA certificate: every host (SuperLink, each client, whoever submits runs)
    ca.key                  CA private key: keep it off the federation's hosts
    server.pem, server.key  SuperLink TLS certificate (with the given host names) and its key: SuperLink host
    supernodes/NAME         SuperNode NAME's authentication private key (OpenSSH, ECDSA P-384): its client host
    supernodes/NAME.pub     its public key: registered on the SuperLink (``crossrec superlink --register``)
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
VALID_DAYS = 365


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_certificates(out: str | os.PathLike[str], hosts: Sequence[str], supernodes: Sequence[str]) -> Path:
    """Write a CA, a SuperLink certificate valid for ``hosts`` and one key pair per SuperNode name."""
    folder = Path(out)
    if not hosts:
        raise ValueError("--host: give at least one host name or IP address the SuperLink is reached at")
    for name in supernodes:
        if not NAME_PATTERN.match(name):
            raise ValueError(f"--supernode {name!r}: use letters, digits, '.', '_' or '-' (it becomes a file name)")
    if len(set(supernodes)) != len(supernodes):
        raise ValueError(f"--supernode: names repeat in {list(supernodes)}")
    existing = [p for p in ("ca.crt", "ca.key", "server.pem", "server.key") if (folder / p).exists()]
    existing += [f"supernodes/{n}" for n in supernodes if (folder / "supernodes" / n).exists()]
    if existing:
        raise FileExistsError(f"{folder} already holds {', '.join(existing)}: choose an empty folder")

    now = datetime.datetime.now(datetime.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crossrec local CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )  # digital_signature, key_cert_sign, crl_sign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(folder / "ca.key", _pem_key(ca_key), private=True)
    _write(folder / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(folder / "server.key", _pem_key(server_key), private=True)
    _write(folder / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    for name in supernodes:
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(folder / "supernodes" / name, private, private=True)
        _write(folder / "supernodes" / f"{name}.pub", public + f" crossrec-{name}\n".encode(), private=False)
    return folder


def check_ca_certificate(path: str | os.PathLike[str]) -> None:
    """Raise a clear error unless ``path`` is a readable PEM certificate."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"CA certificate {file} does not exist (copy ca.crt from whoever made the CA)")
    try:
        x509.load_pem_x509_certificate(file.read_bytes())
    except ValueError as exc:
        raise ValueError(f"CA certificate {file} is not a PEM certificate: {exc}") from exc


def check_supernode_key(path: str | os.PathLike[str]) -> None:
    """Raise a clear error unless ``path`` is an unencrypted OpenSSH EC private key (what flower-supernode reads)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"SuperNode authentication key {file} does not exist")
    try:
        key = serialization.load_ssh_private_key(file.read_bytes(), None)
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"SuperNode authentication key {file} is not an unencrypted OpenSSH private key: {exc}"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"SuperNode authentication key {file} is not an elliptic-curve (ECDSA) key")
