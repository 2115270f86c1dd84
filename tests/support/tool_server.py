"""A scriptable HTTP(S) tool on loopback for tests: it answers queued responses (status, body, delay, redirect,
large body, header echo) and records every request it receives and, over TLS, each server name asked for."""

import datetime
import json
import socket
import ssl
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class ToolResponse:
    """The answer to one request. `size` sends that many bytes of "x" instead of `body`; `echo_headers`
    sends the request's headers back as JSON (as some real services do in their errors)."""

    status: int = 200
    body: str = '{"ok": true}'
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    location: str | None = None
    size: int | None = None
    echo_headers: bool = False


@dataclass
class ToolRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lowercased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client dropping a kept-alive connection (its event loop ended) is normal here, not a test failure.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class ToolServer:
    def __init__(self, host: str = "127.0.0.1", *, tls: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.scheme = "https" if tls else "http"
        self.responses: list[ToolResponse] = []
        self.requests: list[ToolRequest] = []
        self.server_names: list[str | None] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        server_class = _IPv6Server if ":" in host else _Server
        self.server = server_class((host, 0), self._handler())
        if tls is not None:
            tls.sni_callback = self._server_name_record
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def queue(self, *responses: ToolResponse) -> None:
        with self.lock:
            self.responses.extend(responses)

    def start(self) -> "ToolServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()  # releases delayed answers at once
        self.server.shutdown()
        self.server.server_close()

    def _server_name_record(self, sock: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
        with self.lock:
            self.server_names.append(name)

    def _record(self, request: ToolRequest) -> ToolResponse:
        with self.lock:
            self.requests.append(request)
            return self.responses.pop(0) if self.responses else ToolResponse()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        tool = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def handle_any(self) -> None:
                parts = urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {name.lower(): value for name, value in self.headers.items()}
                query = parse_qs(parts.query, keep_blank_values=True)
                response = tool._record(ToolRequest(self.command, parts.path, query, headers, body))
                tool.stopping.wait(response.delay)
                try:
                    self._answer(response, headers)
                except ConnectionError:
                    self.close_connection = True  # the client gave up (timeout or size cap)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = handle_any

            def _answer(self, response: ToolResponse, request_headers: dict[str, str]) -> None:
                if response.echo_headers:
                    data = json.dumps(request_headers).encode()
                elif response.size is not None:
                    data = b"x" * response.size
                else:
                    data = response.body.encode()
                self.send_response(response.status)
                self.send_header("Content-Type", response.content_type)
                self.send_header("Content-Length", str(len(data)))
                if response.location is not None:
                    self.send_header("Location", response.location)
                for name, value in response.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    for start in range(0, len(data), 16384):
                        self.wfile.write(data[start : start + 16384])

        return Handler


def tls_context_make(directory: Path, hostname: str) -> tuple[ssl.SSLContext, Path]:
    """A server context with a certificate for `hostname` only, and the file of the CA that signed it (for
    SSL_CERT_FILE), so a client can be shown to check the certificate against the name, not the address."""

    def certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: Any, ca: bool) -> Any:
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        else:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = certificate("KiteMesh test CA", ca_key, "KiteMesh test CA", ca_key, ca=True)
    leaf_cert = certificate(hostname, leaf_key, "KiteMesh test CA", ca_key, ca=False)
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(leaf_cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context, ca_file
