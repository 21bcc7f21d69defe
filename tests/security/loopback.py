"""Small HTTP servers on 127.0.0.1 that count every connection made to them: stand-ins for
an internal host an attacker wants reached, or for a FHIR server that redirects, pages
elsewhere or answers hostile JSON."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# (status, headers, body) for a request path (with its query).
Responder = Callable[[str], tuple[int, dict[str, str], bytes]]


def not_found(_: str) -> tuple[int, dict[str, str], bytes]:
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error"}]}
    return 404, {"Content-Type": "application/fhir+json"}, json.dumps(outcome).encode()


@dataclass
class Loopback:
    """A running server; ``connections`` counts accepted TCP connections, ``paths`` the
    request paths it was asked for."""

    port: int
    connections: int = 0
    paths: list[str] = field(default_factory=list)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, record: Loopback, handler: type[BaseHTTPRequestHandler]) -> None:
        self.record = record
        super().__init__(("127.0.0.1", 0), handler)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        conn, address = super().get_request()
        self.record.connections += 1
        return conn, address


@contextmanager
def loopback(respond: Responder = not_found) -> Iterator[Loopback]:
    """Serve ``respond`` on a free loopback port for the duration of the block."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            record.paths.append(self.path)
            status, headers, body = respond(self.path)
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the test reads ``paths``, not a log."""

    record = Loopback(port=0)
    server = _Server(record, Handler)
    record.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield record
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
