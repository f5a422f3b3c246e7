"""Raw HTTP/1.1 over a socket, for tests that send what no well-behaved client library would.

``exchange`` sends bytes exactly as given and reads one answer (or notes that
the server closed without one), so framing faults reach the server untouched.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

#: Seconds any single socket operation of a test may block.
TIMEOUT = 10.0


@dataclass
class Answer:
    """One response read off the wire; ``status`` None when the server closed without answering."""

    status: int | None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def describe(self) -> str:
        """Return the answer for an assertion message."""
        return f"{self.status} {self.headers} {self.body[:300]!r}"


def address(url: str) -> tuple[str, int]:
    """Return (host, port) of an ``http://host:port`` URL."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    return host, int(port)


def read_answer(sock: socket.socket, bodiless: bool = False) -> Answer:
    """Read one response: its head, then Content-Length bytes; ``bodiless`` for answers to HEAD."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            if not data:
                return Answer(None)
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length")
    if bodiless or status in (204, 304):
        return Answer(status, headers, b"")
    if length is not None:
        while len(body) < int(length):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        body = body[: int(length)]
    return Answer(status, headers, body)


def exchange(url: str, request: bytes, timeout: float = TIMEOUT, half_close: bool = False) -> Answer:
    """Send ``request`` as is on a new connection and read the answer.

    ``half_close``: then shut our sending side, so a server waiting for more
    body sees its end (nginx then abandons the request, as for a client gone).
    """
    with socket.create_connection(address(url), timeout=timeout) as sock:
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_answer(sock, bodiless=request.startswith(b"HEAD "))
