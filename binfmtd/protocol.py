"""HTTP/1.1 for the API socket on h11, sans I/O: bytes in, requests out; answers in, bytes out.

h11 does the protocol (framing, keep-alive, pipelining, header syntax); this module adds the
API's own limits and turns everything into three results: a complete `Request`, `NEED_MORE`,
or a `ProtocolError` carrying the status to answer with before closing. Limits: the head fits in
8 KiB (431, or 414 when the request line alone does not), the body in 64 KiB (413), bodies need
Content-Length (411 for chunked), HTTP/1.0 or 1.1 only (505), the target is an absolute path
without control characters (400). h11 sends "Connection: close" itself whenever the connection
cannot persist (HTTP/1.0, `Connection: close`, an error).

`Replay` lets a connection answer a repeated request (the same bytes, in one read, at the start
of a keep-alive cycle) with what h11 decided for those bytes the first time, instead of running
h11's state machine again: h11 is deterministic, and only cycles h11 completed cleanly (back to
idle on both sides) are remembered. Anything else goes through h11.
"""

from __future__ import annotations

import ast
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
_BYTES_LITERAL = r"""b'(?:[^'\\]|\\.)*'|b"(?:[^"\\]|\\.)*\""""
_BYTES_REPR = re.compile(rf"bytearray\(({_BYTES_LITERAL})\)|({_BYTES_LITERAL})")
_EXCERPT: Final = 60


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
_HeadKey = tuple[bytes, int, int, bytes, tuple[tuple[str, str], ...]]
_IDLE_CYCLE: Final = (b"", False)


class Replay:
    """What h11 decided for exact request bytes in a fresh cycle, shared by a server's
    connections (one thread): the `Request` they parse to, and the response head h11 wrote for
    each (status, body length, content type, extra headers) it answered them with while keeping
    the connection open. Bounded: at most `size` requests and `4 * size` heads (then it starts
    over). Only requests of at most `max_bytes` are kept."""

    def __init__(self, size: int = 64, max_bytes: int = 1024) -> None:
        self.size, self.max_bytes = size, max_bytes
        self._requests: dict[bytes, Request] = {}
        self._heads: dict[_HeadKey, bytes] = {}

    def request(self, raw: bytes) -> Request | None:
        """The request `raw` parsed to when h11 last completed a clean cycle with it."""
        return self._requests.get(raw)

    def head(self, key: _HeadKey) -> bytes | None:
        """The response head h11 wrote for (raw request, status, length, type, headers)."""
        return self._heads.get(key)

    def learn(self, raw: bytes, request: Request, key: _HeadKey, head: bytes) -> None:
        """Remember one clean h11 cycle: `raw` parsed to `request`, answered with `head`."""
        if len(raw) > self.max_bytes:
            return
        if len(self._requests) >= self.size:
            self._requests.clear()
        if len(self._heads) >= 4 * self.size:
            self._heads.clear()
        self._requests[raw] = request
        self._heads[key] = head


class Connection:
    """One client connection's protocol state: feed bytes, take requests, answer each in turn.

    Requests come out one at a time: after a `Request`, `next_request` returns `NEED_MORE`
    until `respond` answered it (pipelined requests wait in h11's buffer). Errors are sticky.
    """

    def __init__(self, replay: Replay | None = None) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._head: _Head | None = None
        self._body = bytearray()
        self._error: ProtocolError | None = None
        self._at_start = True
        self._closed = False
        self._replay = replay
        self._raw: bytes | None = None  # this cycle's bytes, when they came in one read
        self._request: Request | None = None  # this cycle's request, until answered
        self._taken = False  # whether next_request returned it
        self._replayed = False  # whether it came from `replay` (h11 has not seen it)
        self._clean = True  # h11 idle on both sides, nothing buffered: `_idle()`, kept

    def feed(self, data: bytes) -> None:
        """Bytes read from the peer; b"" means the peer closed its side."""
        if self._replayed:
            self._materialize()  # more bytes behind a replayed request: h11 takes over
        if self._at_start and data:
            data = _skip_blank_lines(data)  # RFC 9112 2.2: CRLFs before a request line
            if not data:
                return  # (an empty feed would tell h11 the peer closed)
            self._at_start = False
            if self._fresh():
                self._raw = data
                if self._replay is not None and self._take(data):
                    return
            else:
                self._raw = None
        elif data:
            self._raw = None
        if self._h11.their_state is not h11.ERROR and not self._closed:
            self._closed = not data
            self._clean = False
            self._h11.receive_data(data)

    def _fresh(self) -> bool:
        """At the start of a cycle, nothing pending: the state `Replay` applies to."""
        return self._clean and self._request is None

    def _idle(self) -> bool:
        """h11 at the start of a cycle on both sides, with nothing buffered."""
        h = self._h11
        idle = h.their_state is h11.IDLE and h.our_state is h11.IDLE
        return idle and h.trailing_data == _IDLE_CYCLE and self._error is None

    def _take(self, raw: bytes) -> bool:
        assert self._replay is not None
        request = self._replay.request(raw)
        if request is None:
            return False
        self._request, self._taken, self._replayed = request, False, True
        return True

    def _materialize(self) -> None:
        """Run h11 over the replayed request's bytes after all, reaching the state it would
        be in had it parsed them (it did, with the same outcome, when `Replay` learnt them)."""
        raw, self._replayed = self._raw, False
        assert raw is not None
        self._clean = False
        self._h11.receive_data(raw)
        for _ in range(3):  # Request, Data when there is a body, EndOfMessage
            if type(self._h11.next_event()) is h11.EndOfMessage:
                return
        self._fail(500, "internal error: a replayed request did not parse again")

    @property
    def buffered(self) -> int:
        """How many unparsed bytes wait (a partial request when non-zero)."""
        if self._error is not None or self._clean:
            return 0
        in_body = self._h11.their_state is h11.SEND_BODY  # a head without all of its body
        return len(self._h11.trailing_data[0]) + len(self._body) + in_body

    @property
    def open(self) -> bool:
        """Whether the connection may carry another request after the last answer."""
        return self._error is None and self._h11.our_state is h11.IDLE

    def next_request(self) -> Parsed:
        """The next complete request, `NEED_MORE`, or the (sticky) error to answer with."""
        if self._request is not None and not self._taken:  # a replayed one
            self._taken = True
            return self._request
        if self._clean:
            return NEED_MORE  # (h11 is idle, with nothing to parse)
        if self._h11.their_state is h11.IDLE and self._h11.trailing_data == _IDLE_CYCLE:
            return NEED_MORE  # the usual case after an answer: nothing new to parse yet
        while self._error is None:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                return self._fail(_status_of(exc, self._h11), _plain(str(exc)))
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
        self._request = Request(head.method, path, query, head.headers, body, alive)
        self._taken = True
        return self._request

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
        parts = self.respond_parts(
            status, body, keep_alive=keep_alive, content_type=content_type, headers=headers
        )
        return bytearray().join(parts)

    def respond_parts(
        self,
        status: int,
        body: bytes,
        *,
        keep_alive: bool = True,
        content_type: bytes = JSON,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> list[bytes]:
        """`respond`, as the pieces to send in order (head, body...), not joined: a server
        can hand them to sendmsg(2) without copying the body."""
        close = not keep_alive or self._error is not None
        key = None if self._raw is None else (self._raw, status, len(body), content_type, headers)
        if self._replayed:
            known = None if close or key is None else self._replay_head(key)
            if known is not None:
                self._replayed, self._request, self._raw = False, None, None
                self._at_start = True
                return [known, body]
            self._materialize()
        self._clean = False  # until h11 is back at the start of a cycle
        head = _response_event(status, len(body), content_type, headers, close)
        try:
            written = self._h11.send(head) or b""
            out = [written]
            out += self._h11.send_with_data_passthrough(h11.Data(data=body)) or ()
            out.append(self._h11.send(_END) or b"")
        except h11.LocalProtocolError as exc:  # a bug in our state handling: close cleanly
            self._error = ProtocolError(500, str(exc))
            return []
        self._at_start = True
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
            self._clean = self._idle()
            size = sum(len(chunk) for chunk in out)
            self._learn(key, written, size == len(written) + len(body))
        self._request = self._raw = None  # the next cycle's bytes are whatever comes next
        return out

    def _replay_head(self, key: _HeadKey) -> bytes | None:
        assert self._replay is not None
        return self._replay.head(key)

    def _learn(self, key: _HeadKey | None, head: bytes, framed: bool) -> None:
        """Remember a cycle h11 completed cleanly from one read's bytes back to idle."""
        request = self._request
        if self._replay is None or key is None or request is None or not framed:
            return
        if request.keep_alive and self._clean:
            self._replay.learn(key[0], request, key, head)


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


def _plain(message: str) -> str:
    """h11's message with the Python reprs of what it rejected (`bytearray(b'...')`) shown as
    quoted text instead, cut to 60 characters as quoted: what a client reads in the 400 body."""
    return _BYTES_REPR.sub(_quoted, message)


def _quoted(match: re.Match[str]) -> str:
    try:
        data = ast.literal_eval(match.group(1) or match.group(2))
    except (ValueError, SyntaxError):
        return match.group(0)
    text = bytes(data).decode("latin-1")
    cut = text[:_EXCERPT]
    while len(json.dumps(cut)) > _EXCERPT + 2:  # escapes (a NUL is \u0000) count as shown
        cut = cut[: len(cut) * 3 // 4]
    return json.dumps(cut + ("..." if len(cut) < len(text) else ""))


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
