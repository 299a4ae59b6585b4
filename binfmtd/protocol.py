"""HTTP/1.1 for the API socket on h11, sans I/O: bytes in, requests out; answers in, bytes out.

h11 does the protocol (framing, keep-alive, pipelining, header syntax); this module adds the
API's own limits and turns everything into three results: a complete `Request`, `NEED_MORE`,
or a `ProtocolError` carrying the status to answer with before closing. Limits: the head fits in
8 KiB (431, or 414 when the request line alone does not), the body in 64 KiB (413), bodies need
Content-Length (411 for chunked), HTTP/1.0 or 1.1 only (505), the target is an absolute path
without control characters (400). h11 sends "Connection: close" itself whenever the connection
cannot persist (HTTP/1.0, `Connection: close`, an error).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from http import HTTPStatus
from typing import Final
from urllib.parse import parse_qsl, unquote

import h11

MAX_HEAD: Final = 8 * 1024
MAX_BODY: Final = 64 * 1024
JSON: Final = b"application/json"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_VERSIONS = (b"1.1", b"1.0")


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
    """No complete request yet (or the previous one still awaits its answer)."""


NEED_MORE: Final = NeedMore()


@dataclass(frozen=True)
class ProtocolError:
    """A request we refuse; answer with `status` and close the connection."""

    status: int
    message: str


Parsed = Request | NeedMore | ProtocolError


class Connection:
    """One client connection's protocol state: feed bytes, take requests, answer each in turn.

    Requests come out one at a time: after a `Request`, `next_request` returns `NEED_MORE`
    until `respond` answered it (pipelined requests wait in h11's buffer). Errors are sticky.
    """

    def __init__(self) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._head: _Head | None = None
        self._body = bytearray()
        self._error: ProtocolError | None = None
        self._at_start = True
        self._closed = False

    def feed(self, data: bytes) -> None:
        """Bytes read from the peer; b"" means the peer closed its side."""
        if self._at_start and data:
            data = _skip_blank_lines(data)  # RFC 9112 2.2: CRLFs before a request line
            if not data:
                return  # (an empty feed would tell h11 the peer closed)
            self._at_start = False
        if self._h11.their_state is not h11.ERROR and not self._closed:
            self._closed = not data
            self._h11.receive_data(data)

    @property
    def buffered(self) -> int:
        """How many unparsed bytes wait (a partial request when non-zero)."""
        if self._error is not None:
            return 0
        in_body = self._h11.their_state is h11.SEND_BODY  # a head without all of its body
        return len(self._h11.trailing_data[0]) + len(self._body) + in_body

    @property
    def open(self) -> bool:
        """Whether the connection may carry another request after the last answer."""
        return self._error is None and self._h11.our_state is h11.IDLE

    def next_request(self) -> Parsed:
        """The next complete request, `NEED_MORE`, or the (sticky) error to answer with."""
        if self._h11.their_state is h11.IDLE and self._h11.trailing_data == (b"", False):
            return NEED_MORE  # the usual case after an answer: nothing new to parse yet
        while self._error is None:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                return self._fail(_status_of(exc, self._h11), str(exc))
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return NEED_MORE
            result = self._on_event(event)
            if result is not None:
                return result
        return self._error

    def _on_event(self, event: object) -> Parsed | None:
        if isinstance(event, h11.Request):
            head = _read_head(event)
            if isinstance(head, ProtocolError):
                return self._fail(head.status, head.message)
            self._head = head
            self._body.clear()
        elif isinstance(event, h11.Data):
            self._body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return self._complete()
        elif isinstance(event, h11.ConnectionClosed):
            return NEED_MORE
        return None

    def _complete(self) -> Parsed:
        head, body = self._head, bytes(self._body) if self._body else b""
        assert head is not None
        self._head = None
        self._body.clear()
        raw_path, _, raw_query = head.target.partition("?")
        path = unquote(raw_path, errors="replace") if "%" in raw_path else raw_path
        if _CONTROL.search(path):
            return self._fail(400, "control character in path")
        query = dict(parse_qsl(raw_query, keep_blank_values=True)) if raw_query else {}
        alive = head.keep_alive and self._h11.their_state is h11.DONE
        return Request(head.method, path, query, head.headers, body, alive)

    def _fail(self, status: int, message: str) -> ProtocolError:
        self._error = ProtocolError(status, message)
        return self._error

    def respond(
        self,
        status: int,
        body: bytes,
        *,
        keep_alive: bool = True,
        content_type: bytes = JSON,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> bytearray:
        """The complete response for the current request (or the error), as bytes to send.
        `keep_alive=False` closes after it; h11 also closes when the request asked to."""
        close = not keep_alive or self._error is not None
        head = _response_event(status, len(body), content_type, headers, close)
        try:
            out = bytearray(self._h11.send(head) or b"")
            for chunk in self._h11.send_with_data_passthrough(h11.Data(data=body)) or ():
                out += chunk
            out += self._h11.send(_END) or b""
        except h11.LocalProtocolError as exc:  # a bug in our state handling: close cleanly
            self._error = ProtocolError(500, str(exc))
            return bytearray()
        self._at_start = True
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
        return out


_END: Final = h11.EndOfMessage()


@lru_cache(maxsize=256)
def _response_event(
    status: int,
    length: int,
    content_type: bytes,
    headers: tuple[tuple[str, str], ...],
    close: bool,
) -> h11.Response:
    """The (immutable) response head, validated by h11 once per distinct shape: a cached read
    view answers with the same one until its body changes."""
    fields = [(b"Content-Type", content_type), (b"Content-Length", b"%d" % length)]
    fields += [(name.encode("ascii"), value.encode("latin-1")) for name, value in headers]
    if close:
        fields.append((b"Connection", b"close"))
    return h11.Response(status_code=status, headers=fields, reason=_reason(status))


def _skip_blank_lines(data: bytes) -> bytes:
    while data.startswith(b"\r\n"):
        data = data[2:]
    return data


@dataclass(frozen=True)
class _Head:
    """What the API keeps of a request head h11 parsed."""

    method: str
    target: str
    headers: dict[str, str]
    keep_alive: bool


def _read_head(event: h11.Request) -> _Head | ProtocolError:
    """The API's limits on a head h11 accepted, checked in one pass over its fields.

    h11 bounds only heads that arrive incomplete, so the size of a complete one is summed here
    (as sent, but for optional whitespace around header values)."""
    if event.http_version not in _VERSIONS:
        return ProtocolError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    target = event.target
    if not target.startswith(b"/") or not target.isascii():
        return ProtocolError(400, "request target must be an absolute ASCII path")
    size = len(event.method) + len(target) + 14
    headers: dict[str, str] = {}
    close = event.http_version != b"1.1"  # h11 keeps only HTTP/1.1 connections open
    for raw_name, raw_value in event.headers:
        size += len(raw_name) + len(raw_value) + 4
        if raw_name == b"transfer-encoding":
            return ProtocolError(411, "chunked bodies are not supported; send Content-Length")
        if raw_name == b"content-length" and (
            len(raw_value.lstrip(b"0")) > 7 or int(raw_value) > MAX_BODY
        ):
            return ProtocolError(413, "request body larger than 64 KiB")
        name, value = raw_name.decode("ascii"), raw_value.decode("latin-1")
        if raw_name == b"connection" and b"close" in raw_value.lower():
            close = True
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    if size > MAX_HEAD:
        return ProtocolError(431, "request head larger than 8 KiB")
    return _Head(event.method.decode("ascii"), target.decode("ascii"), headers, not close)


def _status_of(exc: h11.RemoteProtocolError, conn: h11.Connection) -> int:
    status = exc.error_status_hint
    if status == 431 and b"\n" not in conn.trailing_data[0]:
        return 414  # the request line alone does not fit
    return status


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Unknown"


def encode_json(obj: object) -> bytes:
    """The body encoding every JSON response uses: compact JSON and a final newline."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def error_body(status: int, message: str) -> bytes:
    """The JSON of every error: {"error": message, "status": status} (`wire.ErrorRecord`)."""
    return encode_json({"error": message, "status": status})
