"""Mutual TLS for tests: a throwaway CA with server and client certificates, and a TLS-terminating proxy.

`make_pki(directory)` writes a CA, a server certificate for 127.0.0.1/localhost and a client certificate,
all signed by that CA, as PEM files. `MutualTlsProxy` listens with TLS, demands a client certificate signed
by the CA (the handshake fails without one) and forwards the decrypted bytes to a plain TCP target, e.g. a
broker started with `advertised_port=` the proxy's port so that clients come back through the proxy.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files `make_pki` wrote."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate from another CA, which the proxy must refuse
    stranger_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
    return cert, key


def _leaf(
    common_name: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], *, server: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate (127.0.0.1, localhost), a client certificate and a stranger's, in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca("test CA")
    pki = Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        stranger_cert=directory / "stranger.pem",
        stranger_key=directory / "stranger.key",
    )
    pki.ca.write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
    for (cert, key), cert_path, key_path in (
        (_leaf("broker", ca, server=True), pki.server_cert, pki.server_key),
        (_leaf("ime-bridge", ca, server=False), pki.client_cert, pki.client_key),
        (_leaf("stranger", _ca("another CA"), server=False), pki.stranger_cert, pki.stranger_key),
    ):
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_path)
    return pki


class MutualTlsProxy:
    """TLS on `listen_port` (client certificate required, verified against the CA), plain TCP to the target.

    Threads and blocking sockets, not asyncio: OpenSSL then sends its alert when it refuses a client
    certificate (asyncio's server side closes without it), as a broker's TLS listener does.
    """

    def __init__(self, pki: Pki, target_host: str, target_port: int, *, listen_port: int) -> None:
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
        self._context.verify_mode = ssl.CERT_REQUIRED
        self._context.load_cert_chain(pki.server_cert, pki.server_key)
        self._target = (target_host, target_port)
        self.port = listen_port
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.clients: list[str] = []  # the common name of each verified client certificate
        self.refused: list[str] = []  # why each refused handshake failed

    def start(self) -> None:
        """Listen on 127.0.0.1:port."""
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def stop(self) -> None:
        """Stop listening and close every forwarded connection."""
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:  # closed by stop()
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(5)  # the handshake's deadline
        try:
            client = self._context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            self.refused.append(str(exc))
            raw.close()
            return
        client.settimeout(None)
        subject = dict(item[0] for item in (client.getpeercert() or {}).get("subject", ()))
        self.clients.append(str(subject.get("commonName", "")))
        try:
            target = socket.create_connection(self._target)
        except OSError:
            client.close()
            return
        with self._lock:
            self._sockets |= {client, target}
        threading.Thread(target=self._pipe, args=(target, client), daemon=True).start()
        self._pipe(client, target)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                sink.sendall(data)
        for sock in (source, sink):  # either side ending ends the connection (TLS cannot half-close)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
