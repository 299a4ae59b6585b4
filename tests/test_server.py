"""The API server on real Unix sockets: endpoints, isolation between clients, binding, auth."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from binfmtd.listener import ListenerError, activated_fd
from binfmtd.protocol import MAX_HEAD, Request
from binfmtd.routes import route
from binfmtd.server import ApiServer, Limits
from binfmtd.wire import ApiError

FAST = Limits(request_timeout=0.5, idle_timeout=1.0, send_timeout=0.5, sweep_interval=0.05)
NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by nobody, unlike a venv under /root or /work
STATUS = {"daemon": {"version": "0.1.0", "pid": 1, "ready": True}, "arches": [], "native": []}


class FakeApi:
    """An Api with canned views, recorded mutations, and a gate to hold mutations open."""

    def __init__(self) -> None:
        self.ver = 1
        self.renders = 0
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.gate = threading.Event()
        self.gate.set()

    def version(self) -> int:
        return self.ver

    def status(self) -> dict[str, Any]:
        self.renders += 1
        return {**STATUS, "version": self.ver}

    def platforms(self) -> dict[str, Any]:
        return {"platforms": ["linux/amd64", "linux/arm64"], "native": ["linux/amd64"]}

    def platforms_binfmt(self) -> dict[str, Any]:
        return {"supported": ["linux/amd64", "linux/arm64"], "emulators": ["qemu-aarch64"]}

    def health(self) -> dict[str, Any]:
        return {"ok": True, "ready": True, "last_tick_age_s": 0.1}

    def worker(self) -> dict[str, Any]:
        return {"state": "running"}

    def metrics(self) -> bytes:
        return b"# HELP x y\nx 1.0\n"

    def mutate(self, action: str, arg: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((str(action), arg))
        self.gate.wait(10)
        if arg.get("arch") == "sparc64":
            raise ApiError(404, "architecture 'sparc64' is not configured")
        if arg.get("arch") == "xtensa":
            raise RuntimeError("bug")
        return {"action": str(action), "arg": arg}


class Client:
    """A blocking HTTP/1.1 client on one Unix connection."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def read(self) -> tuple[int, dict[str, str], Any]:
        line = self.file.readline()
        if not line:
            raise EOFError("connection closed")
        headers: dict[str, str] = {}
        while (header := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = header.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self.file.read(int(headers["content-length"]))
        return int(line.split()[1]), headers, json.loads(body)

    def request(self, method: str, target: str, body: bytes = b"") -> tuple[int, Any]:
        self.send(raw_request(method, target, body))
        status, _, answer = self.read()
        return status, answer

    def at_eof(self) -> bool:
        return self.file.read(1) == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def raw_request(method: str, target: str, body: bytes = b"", extra: str = "") -> bytes:
    """The bytes of one request."""
    length = f"Content-Length: {len(body)}\r\n" if body or method == "POST" else ""
    return f"{method} {target} HTTP/1.1\r\nHost: t\r\n{length}{extra}\r\n".encode() + body


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short private directory under /tmp (sun_path is limited to 108 bytes)."""
    path = tempfile.mkdtemp(dir="/tmp", prefix="bt")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def api() -> FakeApi:
    """A fresh fake api."""
    return FakeApi()


@pytest.fixture
def server(sockdir: str, api: FakeApi) -> Iterator[ApiServer]:
    """A running server with short timeouts."""
    srv = ApiServer(os.path.join(sockdir, "run", "api.sock"), None, api, limits=FAST)
    srv.start()
    yield srv
    srv.close()


@pytest.fixture
def client(server: ApiServer) -> Iterator[Client]:
    """A connected client."""
    conn = Client(server.path)
    yield conn
    conn.close()


# --- endpoints -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/v1/status", {**STATUS, "version": 1}),
        ("/v1/platforms", FakeApi().platforms()),
        ("/v1/platforms?format=json", FakeApi().platforms()),
        ("/v1/platforms?format=binfmt", FakeApi().platforms_binfmt()),
        ("/v1/health", FakeApi().health()),
        ("/v1/worker", {"state": "running"}),
    ],
)
def test_read_endpoints(client: Client, target: str, expected: dict[str, Any]) -> None:
    """Every read endpoint answers 200 with the api's view."""
    assert client.request("GET", target) == (200, expected)


def test_reads_are_cached_per_version(client: Client, api: FakeApi) -> None:
    """Status is rendered once per api version, however often it is asked for."""
    for _ in range(20):
        assert client.request("GET", "/v1/status")[0] == 200
    assert api.renders == 1
    api.ver = 2
    assert client.request("GET", "/v1/status")[1]["version"] == 2
    assert api.renders == 2


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        ("GET", "/nope", 404),
        ("GET", "/v1/status/", 404),
        ("POST", "/v1/status", 405),
        ("GET", "/v1/reconcile", 405),
        ("GET", "/v1/platforms?format=yaml", 400),
        ("POST", "/v1/arches/aarch64/explode", 404),
        ("POST", "/v1/arches/AARCH64/enable", 404),
        ("POST", "/v1/arches/a:b/enable", 400),
        ("POST", "/v1/arches/" + "a" * 33 + "/enable", 404),
        ("POST", "/v1/arches/" + "a" * 41 + "/enable", 400),
        ("POST", "/v1/arches/..%2Fx/enable", 404),
        ("POST", "/v1/arches/%2e%2e/enable", 404),
        ("POST", "/v1/arches//enable", 400),
    ],
)
def test_rejections_never_reach_the_api(
    client: Client, api: FakeApi, method: str, target: str, status: int
) -> None:
    """Unknown paths, wrong methods and bad arch names are refused before the api."""
    code, answer = client.request(method, target)
    assert (code, answer["status"]) == (status, status)
    assert answer["error"]
    assert api.calls == []


def test_405_says_what_is_allowed(client: Client) -> None:
    """A wrong method gets an Allow header naming the right one."""
    client.send(raw_request("DELETE", "/v1/status"))
    status, headers, _ = client.read()
    assert (status, headers["allow"]) == (405, "GET")


def test_newline_in_arch_closes_with_400(client: Client, api: FakeApi) -> None:
    """A newline smuggled into the path is a protocol error: 400, then the connection closes."""
    assert client.request("POST", "/v1/arches/x%0a/enable")[0] == 400
    assert client.at_eof()
    assert api.calls == []


@pytest.mark.parametrize(
    ("target", "body", "call"),
    [
        ("/v1/verify", b"", ("verify", {})),
        (
            "/v1/verify",
            b'{"arches": ["aarch64", "riscv64"]}',
            ("verify", {"arches": ["aarch64", "riscv64"]}),
        ),
        ("/v1/verify", b"{}", ("verify", {})),
        ("/v1/reconcile", b"", ("reconcile", {})),
        ("/v1/reload", b"", ("reload", {})),
        ("/v1/arches/aarch64/enable", b"", ("enable", {"arch": "aarch64"})),
        ("/v1/arches/x86_64/disable", b"", ("disable", {"arch": "x86_64"})),
    ],
)
def test_mutations_as_root(
    client: Client, api: FakeApi, target: str, body: bytes, call: tuple[str, dict[str, Any]]
) -> None:
    """Root's mutations reach api.mutate with the action and validated argument."""
    status, answer = client.request("POST", target, body)
    assert status == 200
    assert api.calls == [call]
    assert answer == {"action": call[0], "arg": call[1]}


@pytest.mark.parametrize(
    "body",
    [b"[", b"[]", b'{"arches": "aarch64"}', b'{"arches": ["a x"]}', b'{"other": 1}', b"[" * 5000],
)
def test_bad_verify_bodies(client: Client, api: FakeApi, body: bytes) -> None:
    """verify bodies that are not {"arches": [valid names]} get 400."""
    assert client.request("POST", "/v1/verify", body)[0] == 400
    assert api.calls == []


@pytest.mark.parametrize(
    ("target", "body", "call"),
    [
        ("/v1/arches/arm64/disable", b"", ("disable", {"arch": "aarch64"})),
        ("/v1/arches/linux/arm/v7/enable", b"", ("enable", {"arch": "arm"})),
        ("/v1/arches/linux%2Fppc64le/enable", b"", ("enable", {"arch": "ppc64le"})),
        ("/v1/verify", b'{"arches": ["amd64", "386", "loong64"]}', None),
    ],
)
def test_platform_names_in_api_paths_and_bodies(
    client: Client, api: FakeApi, target: str, body: bytes, call: tuple[str, Any] | None
) -> None:
    """Docker/OCI names in paths and the verify body reach the api as QEMU names."""
    assert client.request("POST", target, body)[0] == 200
    expected = call or ("verify", {"arches": ["x86_64", "i386", "loongarch64"]})
    assert api.calls == [expected]


def test_unknown_arch_gets_did_you_mean(client: Client, api: FakeApi) -> None:
    """An unknown name in a path or verify body is a 404 naming the closest known names."""
    status, answer = client.request("POST", "/v1/arches/arn64/enable")
    assert (status, answer["status"]) == (404, 404)
    assert "unknown architecture 'arn64'; did you mean arm64 (aarch64)" in answer["error"]
    status, answer = client.request("POST", "/v1/verify", b'{"arches": ["../x"]}')
    assert status == 404 and "unknown architecture '../x'" in answer["error"]
    assert api.calls == []


def test_index_lists_every_endpoint(client: Client) -> None:
    """GET / and GET /v1 list every endpoint with its method, access and answer shape."""
    status, index = client.request("GET", "/")
    assert status == 200 and client.request("GET", "/v1") == (200, index)
    listed = {(e["method"], e["path"]) for e in index["endpoints"]}
    assert ("GET", "/v1/status") in listed and ("POST", "/v1/reload") in listed
    assert ("GET", "/metrics") in listed
    assert {e["access"] for e in index["endpoints"]} == {"socket group", "root"}
    assert index["wire"] == 2  # 2: ArchRecord.sha256 became checksum


def test_api_errors_become_statuses(client: Client) -> None:
    """ApiError keeps its status and message; any other exception is a 500, not a crash."""
    status, answer = client.request("POST", "/v1/arches/sparc64/enable")
    assert (status, answer["error"]) == (404, "architecture 'sparc64' is not configured")
    status, answer = client.request("POST", "/v1/arches/xtensa/enable")
    assert (status, answer["status"]) == (500, 500)
    assert client.request("GET", "/v1/health")[0] == 200


def test_slow_mutation_does_not_block_reads(server: ApiServer, api: FakeApi) -> None:
    """While one client waits for a mutation, others are still served at once."""
    api.gate.clear()
    waiting = Client(server.path)
    waiting.send(raw_request("POST", "/v1/reconcile"))
    other = Client(server.path)
    # Answered while the mutation is still held at the gate: a blocked read would time out.
    assert other.request("GET", "/v1/status")[0] == 200
    api.gate.set()
    assert waiting.read()[0] == 200
    waiting.close()
    other.close()


def test_pipelined_requests_answered_in_order(client: Client, api: FakeApi) -> None:
    """Requests sent together, a mutation among them, are answered in order."""
    api.gate.clear()
    client.send(
        raw_request("GET", "/v1/health")
        + raw_request("POST", "/v1/arches/aarch64/enable")
        + raw_request("GET", "/v1/worker")
    )
    assert client.read()[2]["ok"] is True
    threading.Timer(0.1, api.gate.set).start()
    assert client.read()[2]["action"] == "enable"
    assert client.read()[2] == {"state": "running"}


def test_large_answers_to_a_slow_reader_arrive_whole_and_in_order(
    sockdir: str, api: FakeApi
) -> None:
    """Forty pipelined reads of a 200 KB status, read only after the server's socket buffer
    filled: every answer arrives whole, byte for byte, in order (partial sends resumed).

    The server's send timeout is the default (5 s) here: FAST's 0.5 s dropped this reader,
    rightly, when a busy machine delayed it past the 0.3 s pause (seen once in a full run)."""
    api.status = lambda: {"arches": ["x" * 200_000], "version": api.ver}  # type: ignore[method-assign]
    limits = Limits(request_timeout=0.5, idle_timeout=1.0, sweep_interval=0.05)
    with ApiServer(os.path.join(sockdir, "api.sock"), None, api, limits=limits) as srv:
        slow = Client(srv.path, timeout=10)
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            slow.send(raw_request("GET", "/v1/status") * 20 + raw_request("GET", "/v1/health") * 20)
            time.sleep(0.3)  # the server fills the socket and waits for room
            answers = [slow.read() for _ in range(40)]
        finally:
            slow.close()
    assert [a[2] for a in answers[:20]] == [{"arches": ["x" * 200_000], "version": 1}] * 20
    assert [a[2]["ok"] for a in answers[20:]] == [True] * 20


def test_connection_close_is_honoured(client: Client) -> None:
    """Connection: close gets its answer marked close, then EOF."""
    client.send(raw_request("GET", "/v1/health", extra="Connection: close\r\n"))
    _, headers, _ = client.read()
    assert headers["connection"] == "close"
    assert client.at_eof()


# --- hostile and broken clients --------------------------------------------------------------


def assert_served(path: str) -> None:
    """A fresh client gets status five times in a row (a starved one times out and fails)."""
    good = Client(path)
    for _ in range(5):
        assert good.request("GET", "/v1/status")[0] == 200
    good.close()


def test_bad_clients_do_not_disturb_a_good_one(server: ApiServer) -> None:
    """Garbage, oversized, slow, half-closed and non-reading clients leave others unaffected."""
    garbage, oversized, slow, half, hog = (Client(server.path) for _ in range(5))
    garbage.send(b"\x00\xff\x16\x03\x01 hello\r\n\r\n")
    oversized.send(b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * (MAX_HEAD + 10))
    slow.send(b"GET /v1/status HTTP/1.1\r\nHo")
    half.send(raw_request("GET", "/v1/health"))
    half.sock.shutdown(socket.SHUT_WR)
    with contextlib.suppress(OSError):
        hog.sock.setblocking(False)
        hog.send(raw_request("GET", "/v1/status") * 20000)
    assert_served(server.path)
    assert garbage.read()[0] == 400
    assert oversized.read()[0] == 431
    assert half.read()[2]["ok"] is True
    assert half.at_eof()
    assert slow.read()[0] == 408
    assert slow.at_eof()
    assert_served(server.path)
    for conn in (garbage, oversized, slow, half, hog):
        conn.close()


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /v1/status HTTP/1.1\r\nHost: t\r\nX: " + b"a" * (192 * 1024), 431),
        (
            b"POST /v1/verify HTTP/1.1\r\nHost: t\r\nContent-Length: 9999999\r\n\r\n"
            + b"{" * (192 * 1024),
            413,
        ),
    ],
)
def test_oversized_request_gets_its_error_not_a_reset(
    client: Client, raw: bytes, status: int
) -> None:
    """Unread input is drained before closing, so the client reads the error and a clean EOF."""
    client.send(raw)
    got, headers, body = client.read()
    assert (got, headers["connection"], body["status"]) == (status, "close", status)
    assert client.at_eof()


def test_idle_keepalive_connection_is_closed(client: Client) -> None:
    """A keep-alive connection idle past idle_timeout is closed quietly."""
    assert client.request("GET", "/v1/health")[0] == 200
    started = time.monotonic()
    assert client.at_eof()
    assert FAST.idle_timeout - 0.1 < time.monotonic() - started < FAST.idle_timeout + 1.0


def test_silent_new_connection_times_out(client: Client) -> None:
    """A connection that never sends a byte is dropped after request_timeout."""
    started = time.monotonic()
    assert client.at_eof()
    assert time.monotonic() - started < FAST.request_timeout + 1.0


def test_two_hundred_concurrent_clients(server: ApiServer) -> None:
    """200 clients at once all get correct answers."""
    barrier = threading.Barrier(200, timeout=10)

    def one(i: int) -> bool:
        conn = Client(server.path, timeout=10)
        barrier.wait()
        ok = conn.request("GET", "/v1/status")[1]["daemon"]["ready"] is True
        ok = ok and conn.request("GET", f"/v1/platforms?n={i}")[1]["native"] == ["linux/amd64"]
        conn.close()
        return ok

    with ThreadPoolExecutor(max_workers=200) as pool:
        assert all(pool.map(one, range(200)))


def test_connection_cap_answers_503(sockdir: str, api: FakeApi) -> None:
    """Beyond max_connections a client is accepted, told 503, and closed; the rest keep going."""
    limits = Limits(max_connections=3, request_timeout=5.0, sweep_interval=0.05)
    with ApiServer(os.path.join(sockdir, "api.sock"), None, api, limits=limits) as srv:
        held = [Client(srv.path) for _ in range(3)]
        extra = Client(srv.path)
        assert extra.read()[0] == 503
        assert held[0].request("GET", "/v1/health")[0] == 200
        for conn in [*held, extra]:
            conn.close()


def test_close_disconnects_clients(sockdir: str, api: FakeApi) -> None:
    """close() drops connected clients and removes the socket file."""
    srv = ApiServer(os.path.join(sockdir, "api.sock"), None, api, limits=FAST)
    srv.start()
    conn = Client(srv.path)
    assert conn.request("GET", "/v1/health")[0] == 200
    srv.close()
    assert conn.at_eof()
    assert not os.path.exists(srv.path)


def test_close_ends_the_server_thread(sockdir: str, api: FakeApi) -> None:
    """close() leaves no thread behind: the loop's last drain of its wake-up byte never waits
    (it blocked in about 4 closes of 10 when the byte had already been read, and a stopping
    daemon then waited out the join's timeout with a thread stuck in recv)."""
    for i in range(10):
        srv = ApiServer(os.path.join(sockdir, f"api{i}.sock"), None, api, limits=FAST)
        srv.start()
        conn = Client(srv.path)
        assert conn.request("GET", "/v1/health")[0] == 200
        srv.close()
        conn.close()
        assert not srv._thread.is_alive(), f"close {i}: the server thread is still running"


# --- pure routing ----------------------------------------------------------------------------


def test_route_is_pure() -> None:
    """Routing needs no socket: a Request in, a decision out."""
    decision = route(Request("POST", "/v1/arches/riscv64/disable", {}, {}, b"", True))
    assert (decision.action, decision.arg) == ("disable", {"arch": "riscv64"})  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("environ", "pid", "fd"),
    [
        ({"LISTEN_PID": "42", "LISTEN_FDS": "1"}, 42, 3),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "2"}, 42, 3),
        ({"LISTEN_PID": "41", "LISTEN_FDS": "1"}, 42, None),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "0"}, 42, None),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "x"}, 42, None),
        ({}, 42, None),
    ],
)
def test_activated_fd(environ: dict[str, str], pid: int, fd: int | None) -> None:
    """The systemd fd is used only when LISTEN_PID is ours and LISTEN_FDS >= 1."""
    assert activated_fd(environ, pid) == fd


# --- binding ---------------------------------------------------------------------------------


def test_socket_file_mode_and_parent(sockdir: str, api: FakeApi) -> None:
    """The parent directory is created 0755, the socket is 0660, and it goes away on close."""
    path = os.path.join(sockdir, "new", "api.sock")
    with ApiServer(path, None, api):
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o755
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert os.listdir(os.path.dirname(path)) == ["api.sock"]
    assert not os.path.exists(path)


def test_socket_group(sockdir: str, api: FakeApi) -> None:
    """An existing group gets the socket; a missing one is a warning, not a failure."""
    group = grp.getgrgid(NOBODY if _has_gid(NOBODY) else 0)
    path = os.path.join(sockdir, "api.sock")
    with ApiServer(path, group.gr_name, api):
        assert os.stat(path).st_gid == group.gr_gid
    with ApiServer(path, "no-such-group-xyz", api):
        assert os.stat(path).st_gid == os.getegid()


def _has_gid(gid: int) -> bool:
    try:
        grp.getgrgid(gid)
    except KeyError:
        return False
    return True


def test_stale_socket_is_replaced(sockdir: str, api: FakeApi) -> None:
    """A socket file nobody listens on (a crashed daemon's) is removed and rebound."""
    path = os.path.join(sockdir, "api.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()
    with ApiServer(path, None, api) as srv:
        assert Client(path).request("GET", "/v1/health")[0] == 200
        assert srv.path == path


def test_live_socket_is_refused(server: ApiServer, api: FakeApi) -> None:
    """A second server on a path where a daemon answers refuses to start; the first lives on."""
    with pytest.raises(ListenerError, match="already running"):
        ApiServer(server.path, None, api).start()
    assert Client(server.path).request("GET", "/v1/health")[0] == 200


def test_non_socket_file_is_refused(sockdir: str, api: FakeApi) -> None:
    """A regular file at the socket path is never deleted."""
    path = os.path.join(sockdir, "api.sock")
    with open(path, "w") as handle:
        handle.write("precious")
    with pytest.raises(ListenerError, match="not a socket"):
        ApiServer(path, None, api).start()
    with open(path) as handle:
        assert handle.read() == "precious"


def test_replaced_socket_file_is_left_alone(sockdir: str, api: FakeApi) -> None:
    """close() removes the socket only while the path still names the inode we bound."""
    path = os.path.join(sockdir, "api.sock")
    srv = ApiServer(path, None, api)
    srv.start()
    os.unlink(path)
    with open(path, "w") as handle:
        handle.write("someone else's")
    srv.close()
    with open(path) as handle:
        assert handle.read() == "someone else's"


def test_too_long_path_is_refused(api: FakeApi) -> None:
    """A path over sun_path's limit gets a clear error, not a cryptic bind failure."""
    with pytest.raises(ListenerError, match="longer than"):
        ApiServer("/tmp/" + "x" * 120, None, api).start()


ACTIVATED_CHILD = """
import os, sys
from binfmtd.server import ApiServer

class Api:
    def version(self): return 1
    def status(self): return {"pid": os.getpid()}
    def platforms(self): return {}
    def platforms_binfmt(self): return {}
    def health(self): return {"ok": True}
    def worker(self): return {}
    def mutate(self, action, arg): return {}

srv = ApiServer("/nonexistent/unused.sock", None, Api())
srv.start()
print("ready", srv.path, flush=True)
sys.stdin.read()
srv.close()
"""


def test_socket_activation(sockdir: str) -> None:
    """With LISTEN_PID/LISTEN_FDS set as systemd does, the inherited fd 3 is served as-is."""
    path = os.path.join(sockdir, "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    fd = listener.fileno()
    shell = f'exec 3<&{fd}; LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" -c "$1"'
    child = subprocess.Popen(
        ["bash", "-c", shell, sys.executable, ACTIVATED_CHILD],
        pass_fds=[fd],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        lines = iter(child.stdout.readline, "")
        assert next(line for line in lines if line.startswith("ready ")).split()[1] == path
        listener.close()
        assert Client(path).request("GET", "/v1/status")[1] == {"pid": child.pid}
        child.stdin.close()
        assert child.wait(timeout=10) == 0
    finally:
        child.kill()
        child.wait()
    assert stat.S_ISSOCK(os.stat(path).st_mode), "systemd owns the activated socket file"


# --- authorization ---------------------------------------------------------------------------

AS_NOBODY = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES")
    sys.exit(0)
method, target = sys.argv[2], sys.argv[3]
head = "Host: t\\r\\nConnection: close\\r\\nContent-Length: 0\\r\\n"
s.sendall(f"{method} {target} HTTP/1.1\\r\\n{head}\\r\\n".encode())
data = b""
while chunk := s.recv(65536):
    data += chunk
print(data.split(b" ")[1].decode(), data.partition(b"\\r\\n\\r\\n")[2].decode())
"""


def as_nobody(path: str, method: str, target: str) -> str:
    """Connect as uid/gid 65534 (privileges dropped before connecting) and return what it saw."""
    done = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", AS_NOBODY, path, method, target],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture
def open_server(sockdir: str, api: FakeApi) -> Iterator[ApiServer]:
    """A server whose socket anyone may connect to (0666 in a 0755 directory)."""
    os.chmod(sockdir, 0o755)
    with ApiServer(os.path.join(sockdir, "api.sock"), None, api, mode=0o666) as srv:
        yield srv


def test_non_root_may_read(open_server: ApiServer) -> None:
    """A non-root peer can read status."""
    assert as_nobody(open_server.path, "GET", "/v1/health").startswith("200 ")


def test_non_root_may_not_mutate(open_server: ApiServer, api: FakeApi) -> None:
    """A non-root peer gets 403 JSON on every mutation, and the api is never called."""
    for target in ("/v1/reconcile", "/v1/verify", "/v1/arches/aarch64/disable", "/v1/reload"):
        status, body = as_nobody(open_server.path, "POST", target).split(" ", 1)
        assert status == "403"
        assert json.loads(body) == {"error": json.loads(body)["error"], "status": 403}
        assert f"uid is {NOBODY}" in json.loads(body)["error"]
    assert api.calls == []


def test_outsider_cannot_connect(sockdir: str, api: FakeApi) -> None:
    """With the default 0660 root:root socket, a user outside the group gets EACCES."""
    os.chmod(sockdir, 0o755)
    with ApiServer(os.path.join(sockdir, "api.sock"), None, api) as srv:
        assert as_nobody(srv.path, "GET", "/v1/status") == "EACCES"


# --- fairness --------------------------------------------------------------------------------

FLOOD = """
import socket, sys
path, count = sys.argv[1], int(sys.argv[2])
conns, codes = [], {}
for _ in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    try:
        s.sendall(b"GET /v1/health HTTP/1.1\\r\\nHost: t\\r\\n\\r\\n")
    except OSError:
        pass  # refused: the server answered 503 and closed before the request went out
    code = s.recv(65536).split(b" ")[1].decode()
    codes[code] = codes.get(code, 0) + 1
    conns.append(s)
print(" ".join(f"{k}={v}" for k, v in sorted(codes.items())), flush=True)
sys.stdin.read()  # keep every connection open until the test is done
"""


REFUSED = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(sys.argv[1])
print(s.recv(65536).decode())
"""


@pytest.mark.parametrize(
    ("limits", "member_ok"),
    [(Limits(), 64), (Limits(per_uid=10_000), 512 - 32)],
)
def test_member_flood_cannot_starve_root(
    sockdir: str, api: FakeApi, limits: Limits, member_ok: int
) -> None:
    """512 keep-alive connections from one member: it gets its share, root still reconciles."""
    os.chmod(sockdir, 0o755)
    with ApiServer(os.path.join(sockdir, "api.sock"), None, api, mode=0o666, limits=limits) as srv:
        flood = subprocess.Popen(
            [SYSTEM_PYTHON, "-I", "-c", FLOOD, srv.path, "512"],
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert flood.stdout is not None
            assert flood.stdout.readline().split() == [f"200={member_ok}", f"503={512 - member_ok}"]
            roots = [Client(srv.path) for _ in range(8)]
            assert all(c.request("POST", "/v1/reconcile")[0] == 200 for c in roots)
            refused = subprocess.run(
                [SYSTEM_PYTHON, "-I", "-c", REFUSED, srv.path],
                user=NOBODY,
                group=NOBODY,
                extra_groups=[],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout
            assert refused.startswith("HTTP/1.1 503 ") and "too many connections" in refused
        finally:
            flood.kill()
            flood.wait()
