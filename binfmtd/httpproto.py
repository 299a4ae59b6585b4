"""Sans-I/O HTTP/1.1 for the API socket: bytes in, requests out; objects in, response bytes out.

No sockets here. `RequestReader.feed` takes whatever arrived, `next_request` returns a `Request`,
`NEED_MORE`, or a `ProtocolError` carrying the status to answer with before closing. Only what
the API needs is accepted: bodies need Content-Length (no chunked), heads fit in 8 KiB, bodies in
64 KiB, and HTTP/1.1 requests carry Host (RFC 9112 section 3.2).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final
from urllib.parse import parse_qsl, unquote

MAX_HEAD: Final = 8 * 1024
MAX_BODY: Final = 64 * 1024
# RFC 9110 token characters: method and header field names.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Request:
    """One complete request; header names are lower-case, repeated headers joined by ", "."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


@dataclass(frozen=True)
class NeedMore:
    """The buffer holds no complete request yet."""


NEED_MORE: Final = NeedMore()


@dataclass(frozen=True)
class ProtocolError:
    """A request we refuse; answer with `status` and close the connection."""

    status: int
    message: str


@dataclass(frozen=True)
class _Head:
    method: str
    target: str
    minor: int
    headers: dict[str, str] = field(default_factory=dict)


Parsed = Request | NeedMore | ProtocolError


class RequestReader:
    """Per-connection parser state: a buffer, and the first error once one happened."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._error: ProtocolError | None = None

    def feed(self, data: bytes) -> None:
        """Append bytes read from the peer."""
        self._buf += data

    @property
    def buffered(self) -> int:
        """How many bytes wait unparsed (a partial request when non-zero)."""
        return len(self._buf)

    def next_request(self) -> Parsed:
        """The next pipelined request, or why there is none; errors are sticky."""
        if self._error is None:
            result, used = parse_request(self._buf)
            if isinstance(result, ProtocolError):
                self._error = result
            del self._buf[:used]
            return result
        return self._error


def parse_request(buf: bytes | bytearray) -> tuple[Parsed, int]:
    """Parse one request from the start of `buf`; also return how many bytes it used."""
    skip = _leading_blank_lines(buf)
    end = buf.find(b"\r\n\r\n", skip)
    if end < 0:
        return _incomplete_head(buf, skip), 0
    if end + 4 - skip > MAX_HEAD:
        return ProtocolError(431, "request head larger than 8 KiB"), 0
    head = _parse_head(bytes(buf[skip:end]))
    if isinstance(head, ProtocolError):
        return head, 0
    length = _body_length(head)
    if isinstance(length, ProtocolError):
        return length, 0
    body_start = end + 4
    if len(buf) < body_start + length:
        return NEED_MORE, 0
    body = bytes(buf[body_start : body_start + length])
    return _build(head, body), body_start + length


def _leading_blank_lines(buf: bytes | bytearray) -> int:
    """RFC 9112 2.2: ignore CRLFs before the request line (bounded by the head limit)."""
    skip = 0
    while buf.startswith(b"\r\n", skip) and skip < MAX_HEAD:
        skip += 2
    return skip


def _incomplete_head(buf: bytes | bytearray, skip: int) -> Parsed:
    if len(buf) - skip <= MAX_HEAD:
        return NEED_MORE
    if buf.find(b"\r\n", skip, skip + MAX_HEAD) < 0:
        return ProtocolError(414, "request line larger than 8 KiB")
    return ProtocolError(431, "request head larger than 8 KiB")


def _parse_head(raw: bytes) -> _Head | ProtocolError:
    request_line, *lines = raw.split(b"\r\n")
    head = _parse_request_line(request_line)
    if isinstance(head, ProtocolError):
        return head
    for line in lines:
        error = _add_header(head.headers, line)
        if error is not None:
            return error
    if head.minor == 1 and "host" not in head.headers:
        return ProtocolError(400, "HTTP/1.1 request without Host header")
    return head


def _parse_request_line(line: bytes) -> _Head | ProtocolError:
    parts = line.split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        return ProtocolError(400, "malformed request line")
    version = _VERSION.fullmatch(parts[2])
    if version is None:
        return ProtocolError(400, "malformed HTTP version")
    if version[1] != b"1":
        return ProtocolError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    if not parts[1].startswith(b"/") or not parts[1].isascii():
        return ProtocolError(400, "request target must be an absolute ASCII path")
    target = parts[1].decode("ascii")
    return _Head(parts[0].decode("ascii"), target, int(version[2]))


def _add_header(headers: dict[str, str], line: bytes) -> ProtocolError | None:
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.fullmatch(name):
        return ProtocolError(400, "malformed header line")
    text = value.strip(b" \t").decode("latin-1")
    if _CONTROL.search(text.replace("\t", " ")):
        return ProtocolError(400, "control character in header value")
    key = name.decode("ascii").lower()
    if key in headers:
        if key == "content-length" and headers[key] != text:
            return ProtocolError(400, "conflicting Content-Length headers")
        text = text if key == "content-length" else f"{headers[key]}, {text}"
    headers[key] = text
    return None


def _body_length(head: _Head) -> int | ProtocolError:
    if "transfer-encoding" in head.headers:
        if "content-length" in head.headers:
            return ProtocolError(400, "both Transfer-Encoding and Content-Length")
        return ProtocolError(411, "chunked bodies are not supported; send Content-Length")
    raw = head.headers.get("content-length", "0")
    if not raw.isascii() or not raw.isdigit():
        return ProtocolError(400, "invalid Content-Length")
    if len(raw.lstrip("0")) > 7 or int(raw) > MAX_BODY:
        return ProtocolError(413, "request body larger than 64 KiB")
    return int(raw)


def _build(head: _Head, body: bytes) -> Request | ProtocolError:
    raw_path, _, raw_query = head.target.partition("?")
    path = unquote(raw_path, errors="replace") if "%" in raw_path else raw_path
    if _CONTROL.search(path):
        return ProtocolError(400, "control character in path")
    query = dict(parse_qsl(raw_query, keep_blank_values=True)) if raw_query else {}
    alive = _keep_alive(head.minor, head.headers.get("connection", ""))
    return Request(head.method, path, query, head.headers, body, alive)


def _keep_alive(minor: int, connection: str) -> bool:
    """HTTP/1.1 persists unless "close"; HTTP/1.0 closes unless "keep-alive" (RFC 9112 9.3)."""
    tokens = {token.strip().lower() for token in connection.split(",")}
    if "close" in tokens:
        return False
    return minor >= 1 or "keep-alive" in tokens


def encode_json(obj: object) -> bytes:
    """The body encoding every response uses: compact JSON and a final newline."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def response(
    status: int,
    obj: object,
    *,
    keep_alive: bool,
    headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """A complete JSON response for `obj`."""
    return response_bytes(status, encode_json(obj), keep_alive=keep_alive, headers=headers)


def response_bytes(
    status: int,
    body: bytes,
    *,
    keep_alive: bool,
    headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """A complete response around an already-encoded JSON `body`."""
    lines = [
        f"HTTP/1.1 {status} {_reason(status)}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: keep-alive" if keep_alive else "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def error_body(status: int, message: str) -> dict[str, object]:
    """The JSON shape of every error: {"error": message, "status": status}."""
    return {"error": message, "status": status}


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"
