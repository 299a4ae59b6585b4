"""The sans-I/O HTTP layer on h11: bytes in, requests or errors out; no sockets anywhere."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from binfmtd.protocol import (
    MAX_BODY,
    MAX_HEAD,
    NEED_MORE,
    Connection,
    NeedMore,
    ProtocolError,
    Replay,
    Request,
    encode_json,
)

GET = b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n"
BODY = b'{"arches": ["aarch64"]}'
POST = b"POST /v1/verify HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)


def one(data: bytes) -> Request | NeedMore | ProtocolError:
    """Parse `data` with a fresh reader."""
    reader = Connection()
    reader.feed(data)
    return reader.next_request()


def test_simple_get() -> None:
    """A minimal HTTP/1.1 GET parses into method, path, headers and keep-alive."""
    request = one(GET)
    assert request == Request("GET", "/v1/status", {}, {"host": "x"}, b"", keep_alive=True)


def test_post_with_body() -> None:
    """A body is read exactly by Content-Length."""
    raw = b"POST /v1/verify HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nabcdEXTRA"
    conn = Connection()
    conn.feed(raw)
    request = conn.next_request()
    assert isinstance(request, Request)
    assert request.body == b"abcd"
    assert conn.buffered == len(b"EXTRA")


def test_query_string() -> None:
    """The query string becomes a dict; the path keeps no query."""
    request = one(b"GET /v1/platforms?format=binfmt&x= HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(request, Request)
    assert (request.path, request.query) == ("/v1/platforms", {"format": "binfmt", "x": ""})


def test_percent_decoding_of_path() -> None:
    """Percent escapes in the path are decoded before routing sees them."""
    request = one(b"POST /v1/arches/..%2Fx/enable HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(request, Request)
    assert request.path == "/v1/arches/../x/enable"


@pytest.mark.parametrize(
    ("raw", "keep_alive"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Keep-Alive, CLOSE\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", False),
    ],
)
def test_keep_alive_rules(raw: bytes, keep_alive: bool) -> None:
    """HTTP/1.1 persists unless Connection: close; HTTP/1.0 closes (h11 has no 1.0 keep-alive)."""
    request = one(raw)
    assert isinstance(request, Request)
    assert request.keep_alive is keep_alive


def test_repeated_headers_are_joined() -> None:
    """Repeated header fields are combined into one comma-separated value."""
    request = one(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    assert isinstance(request, Request)
    assert request.headers["x-a"] == "1, 2"


def test_leading_blank_lines_ignored() -> None:
    """CRLFs before the request line are skipped (RFC 9112 2.2)."""
    assert isinstance(one(b"\r\n\r\n" + GET), Request)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /v1/status\r\nHost: x\r\n\r\n", 400),
        (b"GET  /v1/status HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET / HTTP/0.9\r\nHost: x\r\n\r\n", 505),
        (b"GET / FTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", 400),
        (b"GET /%00 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /a%0ab HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: x\r\nContent-Length: 3\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n", 431),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 65537\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n", 413),
    ],
)
def test_rejections(raw: bytes, status: int) -> None:
    """Malformed or unsupported requests get the status that says why."""
    result = one(raw)
    assert isinstance(result, ProtocolError)
    assert result.status == status


def test_body_at_the_limit_is_accepted() -> None:
    """A body of exactly 64 KiB is fine."""
    raw = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % MAX_BODY + b"a" * MAX_BODY
    request = one(raw)
    assert isinstance(request, Request)
    assert len(request.body) == MAX_BODY


def test_head_over_limit_is_431() -> None:
    """Headers that do not fit in 8 KiB get 431 even before the head ends."""
    raw = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * MAX_HEAD
    result = one(raw)
    assert isinstance(result, ProtocolError)
    assert result.status == 431


def test_head_at_limit_is_accepted() -> None:
    """A head of exactly 8 KiB, terminator included, is fine."""
    start = b"GET / HTTP/1.1\r\nHost: x\r\nX: "
    raw = start + b"a" * (MAX_HEAD - len(start) - 4) + b"\r\n\r\n"
    assert len(raw) == MAX_HEAD
    assert isinstance(one(raw), Request)


def test_request_line_over_limit_is_414() -> None:
    """A request line that never ends within 8 KiB gets 414."""
    result = one(b"GET /" + b"a" * MAX_HEAD)
    assert isinstance(result, ProtocolError)
    assert result.status == 414


def test_pipelined_requests_come_out_in_order() -> None:
    """Several requests in one buffer come out one by one, each after the previous answer."""
    reader = Connection()
    reader.feed(GET + POST + GET.replace(b"status", b"health"))
    paths = []
    for _ in range(4):
        request = reader.next_request()
        paths.append(getattr(request, "path", None))
        assert reader.next_request() is NEED_MORE  # the answer comes first
        reader.respond(200, b"{}\n")
    assert paths == ["/v1/status", "/v1/verify", "/v1/health", None]
    assert reader.buffered == 0


def test_byte_by_byte_feeding() -> None:
    """Feeding one byte at a time yields NEED_MORE until the last byte completes the request."""
    reader = Connection()
    results = []
    for i in range(len(POST)):
        reader.feed(POST[i : i + 1])
        results.append(reader.next_request())
    assert all(r is NEED_MORE for r in results[:-1])
    assert isinstance(results[-1], Request)
    assert json.loads(results[-1].body) == {"arches": ["aarch64"]}


def test_errors_are_sticky() -> None:
    """After a protocol error, the reader keeps returning it: the connection is done."""
    reader = Connection()
    reader.feed(b"BROKEN\r\n\r\n")
    first = reader.next_request()
    reader.feed(GET)
    assert isinstance(first, ProtocolError)
    assert reader.next_request() == first
    assert not reader.open


def response(
    status: int, obj: object, keep_alive: bool, headers: tuple[tuple[str, str], ...] = ()
) -> bytearray:
    """The bytes a fresh connection answers one GET with."""
    conn = Connection()
    conn.feed(GET)
    assert isinstance(conn.next_request(), Request)
    return conn.respond(status, encode_json(obj), keep_alive=keep_alive, headers=headers)


def test_response_shape() -> None:
    """Responses carry status line, JSON type, exact length and the connection decision."""
    raw = response(
        404, {"error": "no", "status": 404}, keep_alive=False, headers=(("Allow", "GET"),)
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = [line.lower() for line in head.decode().split("\r\n")]
    assert lines[0] == "http/1.1 404 not found"
    assert "content-type: application/json" in lines
    assert f"content-length: {len(body)}" in lines
    assert "connection: close" in lines
    assert "allow: get" in lines
    assert json.loads(body) == {"error": "no", "status": 404}


def test_response_keep_alive_and_unknown_status() -> None:
    """keep_alive keeps the connection open, and an unregistered status code still renders."""
    conn = Connection()
    conn.feed(GET)
    assert isinstance(conn.next_request(), Request)
    raw = conn.respond(299, b"{}", keep_alive=True)
    assert raw.startswith(b"HTTP/1.1 299 Unknown\r\n")
    assert b"connection: close" not in raw.lower()
    assert conn.open


def test_error_answer_without_a_request() -> None:
    """A refusal before any request (503, 408) still renders, and closes."""
    raw = Connection().respond(503, b"{}", keep_alive=False)
    assert raw.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"connection: close" in raw.lower()


VALID = [
    GET,
    POST,
    b"GET /v1/platforms?format=binfmt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"POST /v1/arches/aarch64/enable HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
]
PARSER_RESULTS = (Request, NeedMore, ProtocolError)


def test_every_truncation_of_valid_requests_needs_more() -> None:
    """Every strict prefix of a valid request is NEED_MORE, never an error or exception."""
    for raw in VALID:
        for cut in range(len(raw)):
            assert one(raw[:cut]) is NEED_MORE, (raw, cut)
        assert isinstance(one(raw), Request)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_never_raise(data: bytes) -> None:
    """Arbitrary bytes produce only the parser's own result types."""
    reader = Connection()
    reader.feed(data)
    for _ in range(4):
        assert isinstance(reader.next_request(), PARSER_RESULTS)


HEADERISH = st.lists(
    st.sampled_from(
        [
            *(b"GET", b"POST", b" ", b"/", b"/v1/status", b"?", b"=", b"%", b"%zz", b"%ff"),
            *(b"HTTP/1.1", b"HTTP/1.0", b"\r\n", b"\r\n\r\n", b":", b"Host", b"12", b"-"),
            *(b"Content-Length", b"Transfer-Encoding", b"Connection", b"close"),
            *(b"\x00", b"\xff", b"\t", b"a" * 100),
        ]
    ),
    max_size=60,
)


@settings(max_examples=500, deadline=None)
@given(HEADERISH, st.integers(min_value=1, max_value=64))
def test_http_like_noise_in_chunks_never_raises(parts: list[bytes], chunk: int) -> None:
    """HTTP-shaped noise fed in arbitrary chunk sizes produces only parser results."""
    data = b"".join(parts)
    reader = Connection()
    for i in range(0, len(data), chunk):
        reader.feed(data[i : i + chunk])
        for _ in range(3):
            assert isinstance(reader.next_request(), PARSER_RESULTS)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(VALID), st.binary(max_size=64), st.integers(min_value=0, max_value=200))
def test_valid_request_with_garbage_and_cut(raw: bytes, junk: bytes, cut: int) -> None:
    """A valid request followed by junk, cut anywhere, yields only parser results."""
    reader = Connection()
    reader.feed((raw + junk)[:cut])
    for _ in range(3):
        assert isinstance(reader.next_request(), PARSER_RESULTS)


# --- Replay: a repeated request answered from what h11 decided the first time -------------

REPLAY_CHUNKS = [
    GET,
    GET,
    b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /v1/status HTTP/1.0\r\n\r\n",
    b"GET /v1/health?x=1 HTTP/1.1\r\nHost: x\r\n\r\n",
    POST,
    GET + GET,
    GET[:10],
    GET[10:],
    b"\r\n" + GET,
    b"GET /v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab",
    b"cd",
    b"GET /bad\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"NOT HTTP\r\n\r\n",
    b"",
]


def transcript(
    conn: Connection, chunks: list[bytes], answers: list[tuple[int, int, bool]]
) -> list[object]:
    """Feed `chunks`, answering each request with the next (status, body size, keep-alive);
    everything the connection says, in order."""
    said: list[object] = []
    turn = 0
    for chunk in chunks:
        conn.feed(chunk)
        while True:
            parsed = conn.next_request()
            said.append(parsed)
            if isinstance(parsed, NeedMore):
                break
            if isinstance(parsed, ProtocolError):
                said.append(bytes(conn.respond(parsed.status, b"{}", keep_alive=False)))
                return said
            status, size, alive = answers[turn % len(answers)]
            turn += 1
            said.append(bytes(conn.respond(status, b"x" * size, keep_alive=alive)))
            said.append((conn.open, conn.buffered))
        if not conn.open:
            return said
    return said


@settings(max_examples=300, deadline=None)
@given(
    warm=st.lists(st.sampled_from(REPLAY_CHUNKS), max_size=6),
    chunks=st.lists(st.sampled_from(REPLAY_CHUNKS), min_size=1, max_size=8),
    answers=st.lists(
        st.tuples(st.sampled_from([200, 404]), st.integers(0, 3), st.booleans()),
        min_size=1,
        max_size=4,
    ),
)
def test_replay_says_exactly_what_h11_says(
    warm: list[bytes], chunks: list[bytes], answers: list[tuple[int, int, bool]]
) -> None:
    """With a shared Replay (warmed by other connections), every request, answer and
    connection state is byte for byte what a connection running h11 on everything gives."""
    replay = Replay()
    transcript(Connection(replay), warm, answers)
    transcript(Connection(replay), chunks, answers)
    assert transcript(Connection(replay), chunks, answers) == transcript(
        Connection(), chunks, answers
    )


def test_replay_learns_only_clean_keep_alive_cycles() -> None:
    """A request is remembered after h11 answered it and both sides went back to idle; not
    when the connection closes, nor when more bytes (a pipelined request) came with it."""
    replay = Replay()
    close = b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    for data in (close, GET + GET):
        conn = Connection(replay)
        conn.feed(data)
        assert isinstance(conn.next_request(), Request)
        conn.respond(200, b"{}")
    assert replay.request(close) is None
    assert replay.request(GET + GET) is None
    assert replay.request(GET) is None
    conn = Connection(replay)
    conn.feed(GET)
    request = conn.next_request()
    conn.respond(200, b"{}")
    assert replay.request(GET) == request


def test_replay_is_bounded() -> None:
    """A client sending ever-new requests cannot grow the replay memory without bound."""
    replay = Replay(size=4)
    for n in range(50):
        conn = Connection(replay)
        conn.feed(b"GET /v1/status?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % n)
        assert isinstance(conn.next_request(), Request)
        conn.respond(200, b"{}")
    assert (
        sum(
            replay.request(b"GET /v1/status?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % n) is not None
            for n in range(50)
        )
        <= 4
    )


def test_replayed_request_survives_more_bytes_before_it_is_taken() -> None:
    """Bytes arriving behind a replayed request hand the connection back to h11 without
    losing that request: it comes out first, then the pipelined one."""
    replay = Replay()
    warm = Connection(replay)
    warm.feed(GET)
    assert isinstance(warm.next_request(), Request)
    warm.respond(200, b"{}")
    assert replay.request(GET) is not None
    conn = Connection(replay)
    conn.feed(GET)
    conn.feed(POST)
    first = conn.next_request()
    assert isinstance(first, Request) and first.path == "/v1/status"
    assert conn.next_request() is NEED_MORE
    conn.respond(200, b"{}")
    second = conn.next_request()
    assert isinstance(second, Request) and second.body == BODY


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (b"NOT HTTP\r\n\r\n", 'illegal request line: "NOT HTTP"'),
        (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", 'illegal header line: "bad header"'),
        (b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n", 'illegal header line: "Ho st: x"'),
    ],
)
def test_malformed_request_is_described_as_text(raw: bytes, shown: str) -> None:
    """A 400 for a malformed line quotes the line as text, not as a Python bytearray repr."""
    error = one(raw)
    assert error == ProtocolError(400, shown)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_no_python_repr_in_any_error(garbage: bytes) -> None:
    """Whatever a client sends, an error message holds no Python bytes repr, and quotes at
    most 60 characters of what it rejected."""
    error = one(b"GET / HTTP/1.1\r\n" + garbage + b"\r\n\r\n")
    if isinstance(error, ProtocolError):
        assert "bytearray(" not in error.message
        outside_quotes = re.sub(r'"(?:[^"\\]|\\.)*"', "", error.message)
        assert "b'" not in outside_quotes and 'b"' not in outside_quotes
        assert len(error.message) < 200
