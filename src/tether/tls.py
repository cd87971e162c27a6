"""TLS without a proxy: the server's context from TLS_CERT and TLS_KEY, a client's from a CA file.

The files are checked one by one first, so that an error names the variable
whose file is wrong (a PEM that is not a certificate, a key that is encrypted
or belongs to another certificate) instead of OpenSSL's "PEM lib".
`cryptography` (a dependency already, for tokens) reads them; it is imported
only when TLS is configured.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from tether.errors import ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
    from cryptography.x509 import Certificate

# TLS 1.0 and 1.1 are deprecated (RFC 8996); browsers have not offered them since 2020.
MIN_VERSION = ssl.TLSVersion.TLSv1_2


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror or exc}): {path}") from None


def certificates(path: str) -> list[Certificate]:
    """The PEM certificates in `path`, the server's first; ValueError saying what is wrong."""
    from cryptography import x509

    data = _read(path)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ValueError(f"is not a PEM certificate (no BEGIN CERTIFICATE): {path}")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ValueError(f"is not a valid PEM certificate ({exc}): {path}") from None


def private_key(path: str) -> PrivateKeyTypes:
    """The PEM private key in `path`; ValueError saying what is wrong."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = _read(path)
    try:
        return load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError(f"is encrypted (tether needs the key without a passphrase): {path}"
                         ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"is not a PEM private key ({type(exc).__name__}): {path}") from None


def check_cert(raw: str) -> str | None:
    """The parser of TLS_CERT: the path, once its file holds a certificate."""
    path = raw.strip()
    if path:
        certificates(path)
    return path or None


def check_key(raw: str) -> str | None:
    """The parser of TLS_KEY: the path, once its file holds an unencrypted private key."""
    path = raw.strip()
    if path:
        private_key(path)
    return path or None


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """The server's context: TLS 1.2 or later, HTTP/1.1 (the WebSocket upgrade needs it).

    Raises ConfigError naming TLS_CERT or TLS_KEY when a file is unusable or
    the key is not the certificate's.
    """
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    try:
        leaf = certificates(cert)[0]
    except ValueError as exc:
        raise ConfigError("TLS_CERT", str(exc)) from None
    try:
        pair = private_key(key)
    except ValueError as exc:
        raise ConfigError("TLS_KEY", str(exc)) from None
    spki = Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != pair.public_key().public_bytes(*spki):
        raise ConfigError("TLS_KEY", f"is not the private key of the certificate in TLS_CERT "
                                     f"({cert}): {key}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSION
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError("TLS_CERT", f"cannot be used with TLS_KEY ({exc}): {cert}") from None
    return ctx


def client_context(ca_file: str | None = None) -> ssl.SSLContext:
    """A client's context: the system's CAs, or only those of `ca_file` (a private CA).

    The host name is checked, as by a browser. ValueError when `ca_file`
    cannot be read or holds no certificate.
    """
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
    except FileNotFoundError as exc:
        raise ValueError(f"cannot be read ({exc.strerror}): {ca_file}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"is not a PEM CA certificate ({exc}): {ca_file}") from None
    ctx.minimum_version = MIN_VERSION
    return ctx
