"""The daemon's Unix-socket API: HTTP/1.1 + JSON, so `curl --unix-socket` works.

One `selectors` loop in a background thread serves every connection with non-blocking sockets,
so the reconcile loop is never blocked by a client and one slow or hostile client cannot stall
the others. Reads are served from memory: encoded bodies are cached per `Api.version()`.
Mutations run one at a time on a worker thread; the loop keeps serving while they run.
Who may do what is decided by the peer's credentials (SO_PEERCRED): anyone who can connect
may read (the socket's 0660 root:<group> mode limits that), only uid 0 may mutate.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import re
import selectors
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, Protocol, cast

import structlog

from binfmtd.httpproto import (
    ProtocolError,
    Request,
    RequestReader,
    encode_json,
    error_body,
    response,
    response_bytes,
)

log = structlog.get_logger("binfmtd.server")

ARCH_NAME: Final = re.compile(r"[a-z0-9_]{1,32}")
SD_LISTEN_FDS_START: Final = 3
MAX_UNIX_PATH: Final = 107
_PEERCRED: Final = struct.Struct("3i")
_RECV_SIZE: Final = 64 * 1024
_OUT_HIGH_WATER: Final = 256 * 1024


class ApiError(Exception):
    """What `Api.mutate` raises to answer with an HTTP error status and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Api(Protocol):
    """What the daemon implements. Read methods run on the server thread: they must be cheap
    and thread-safe (return an immutable snapshot). `version()` must change after any read
    view changes (bump it after publishing the new snapshot). `health()` is never cached."""

    def version(self) -> int: ...
    def status(self) -> Mapping[str, Any]: ...
    def platforms(self) -> Mapping[str, Any]: ...
    def platforms_binfmt(self) -> Mapping[str, Any]: ...
    def health(self) -> Mapping[str, Any]: ...
    def worker(self) -> Mapping[str, Any]: ...
    def mutate(self, action: str, arg: dict[str, Any]) -> Mapping[str, Any]: ...


class View(StrEnum):
    """The read endpoints; each value names the `Api` method that renders it."""

    STATUS = "status"
    PLATFORMS = "platforms"
    PLATFORMS_BINFMT = "platforms_binfmt"
    HEALTH = "health"
    WORKER = "worker"


class Action(StrEnum):
    """The mutating endpoints, as passed to `Api.mutate`."""

    VERIFY = "verify"
    RECONCILE = "reconcile"
    ENABLE = "enable"
    DISABLE = "disable"
    RELOAD = "reload"


@dataclass(frozen=True)
class Read:
    """Route to a read view."""

    view: View


@dataclass(frozen=True)
class Mutation:
    """Route to `Api.mutate(action, arg)`."""

    action: Action
    arg: dict[str, Any]


@dataclass(frozen=True)
class Reject:
    """Answer with an error without reaching the api."""

    status: int
    message: str
    allow: str | None = None


Route = Read | Mutation | Reject

_READ_PATHS: Final = {
    "/v1/status": View.STATUS,
    "/v1/platforms": View.PLATFORMS,
    "/v1/health": View.HEALTH,
    "/v1/worker": View.WORKER,
}
_PLAIN_MUTATIONS: Final = {
    "/v1/verify": Action.VERIFY,
    "/v1/reconcile": Action.RECONCILE,
    "/v1/reload": Action.RELOAD,
}


def route(request: Request) -> Route:
    """Map a request to what answers it; every input is validated here, before the api."""
    if request.path in _READ_PATHS:
        if request.method != "GET":
            return Reject(405, f"{request.path} only supports GET", allow="GET")
        return _read_route(_READ_PATHS[request.path], request.query)
    target = _mutation_target(request.path)
    if target is None:
        return Reject(404, f"no such endpoint: {request.path}")
    if request.method != "POST":
        return Reject(405, f"{request.path} only supports POST", allow="POST")
    if isinstance(target, Reject):
        return target
    if target.action is Action.VERIFY:
        return _verify_route(request.body)
    return target


def _read_route(view: View, query: Mapping[str, str]) -> Route:
    if view is not View.PLATFORMS or query.get("format", "json") == "json":
        return Read(view)
    if query["format"] == "binfmt":
        return Read(View.PLATFORMS_BINFMT)
    return Reject(400, "format must be json or binfmt")


def _mutation_target(path: str) -> Mutation | Reject | None:
    if path in _PLAIN_MUTATIONS:
        return Mutation(_PLAIN_MUTATIONS[path], {})
    parts = path.split("/")
    if len(parts) != 5 or parts[:3] != ["", "v1", "arches"]:
        return None
    if parts[4] not in (Action.ENABLE, Action.DISABLE):
        return None
    if not ARCH_NAME.fullmatch(parts[3]):
        return Reject(400, f"invalid arch name {parts[3]!r}: expected [a-z0-9_]{{1,32}}")
    return Mutation(Action(parts[4]), {"arch": parts[3]})


def _verify_route(body: bytes) -> Mutation | Reject:
    if not body.strip():
        return Mutation(Action.VERIFY, {})
    try:
        arg = json.loads(body)
    except (ValueError, RecursionError):
        return Reject(400, 'body must be JSON like {"arches": ["aarch64"]}')
    if not isinstance(arg, dict) or set(arg) - {"arches"}:
        return Reject(400, 'body must be an object with only the key "arches"')
    arches = arg.get("arches", [])
    if not isinstance(arches, list) or not all(_is_arch(a) for a in arches):
        return Reject(400, "arches must be a list of names matching [a-z0-9_]{1,32}")
    return Mutation(Action.VERIFY, {"arches": arches} if "arches" in arg else {})


def _is_arch(value: object) -> bool:
    return isinstance(value, str) and ARCH_NAME.fullmatch(value) is not None


# --- binding -------------------------------------------------------------------------------


class ListenerError(RuntimeError):
    """The API socket cannot be set up; the message says why and what to do."""


@dataclass(frozen=True)
class Listener:
    """A listening socket; `identity` is (st_dev, st_ino) of the socket file we created."""

    sock: socket.socket
    path: str
    activated: bool
    identity: tuple[int, int] | None


def activated_fd(environ: Mapping[str, str], pid: int) -> int | None:
    """The systemd-passed socket (sd_listen_fds), if these variables are meant for `pid`."""
    if environ.get("LISTEN_PID") != str(pid):
        return None
    count = environ.get("LISTEN_FDS", "0")
    return SD_LISTEN_FDS_START if count.isdigit() and int(count) >= 1 else None


def open_listener(
    path: str,
    *,
    group: str | None,
    mode: int = 0o660,
    environ: Mapping[str, str] | None = None,
) -> Listener:
    """Adopt the socket-activated fd, or bind `path` ourselves (replacing a stale socket)."""
    fd = activated_fd(os.environ if environ is None else environ, os.getpid())
    if fd is not None:
        return _adopt(fd)
    return _bind(path, group, mode)


def _adopt(fd: int) -> Listener:
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ListenerError(f"fd {fd} from systemd is not a Unix stream socket; fix the .socket")
    sock.set_inheritable(False)
    sock.setblocking(False)
    return Listener(sock, str(sock.getsockname()), activated=True, identity=None)


def _bind(path: str, group: str | None, mode: int) -> Listener:
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise ListenerError(f"socket path {path} is longer than {MAX_UNIX_PATH} bytes")
    parent = os.path.dirname(os.path.abspath(path))
    _ensure_dir(parent)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bind under a private name, set mode and group, then link into place: the socket never
    # appears at `path` with the umask's permissions, and link() refuses to clobber.
    tmp = os.path.join(parent, f".binfmtd-{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        sock.bind(tmp)
        os.chmod(tmp, mode)
        _chgrp(tmp, group)
        os.link(tmp, path)
    except FileExistsError:
        sock.close()
        raise ListenerError(
            f"{path} appeared while binding; is another binfmtd starting?"
        ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    st = os.stat(path)
    sock.listen(512)
    sock.setblocking(False)
    return Listener(sock, path, activated=False, identity=(st.st_dev, st.st_ino))


def _ensure_dir(parent: str) -> None:
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o755, exist_ok=True)
        os.chmod(parent, 0o755)


def _remove_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenerError(f"{path} exists and is not a socket; move it away or change socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            log.info("stale_socket_removed", path=path)
            return
        except OSError as exc:
            raise ListenerError(f"cannot tell whether {path} is in use: {exc}") from exc
    raise ListenerError(f"binfmtd is already running on {path}; stop it first")


def _chgrp(path: str, group: str | None) -> None:
    if group is None:
        return
    try:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    except KeyError:
        log.warning("socket_group_missing", group=group, path=path, hint="only root can connect")
    except OSError as exc:
        log.warning("socket_chown_failed", group=group, path=path, errno=exc.errno)


# --- serving -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Per-connection budgets, in seconds, and the connection cap."""

    max_connections: int = 512
    request_timeout: float = 5.0
    idle_timeout: float = 30.0
    send_timeout: float = 5.0
    sweep_interval: float = 0.25


@dataclass(frozen=True)
class Peer:
    """Who is on the other end, from SO_PEERCRED at connect time."""

    pid: int
    uid: int
    gid: int


@dataclass(eq=False)
class _Conn:
    """One client. `mark` is when the running deadline started: the request's first byte,
    the last send progress, or the end of the last response (keep-alive idle)."""

    sock: socket.socket
    peer: Peer
    mark: float
    reader: RequestReader = field(default_factory=RequestReader)
    out: bytearray = field(default_factory=bytearray)
    events: int = 0
    busy: bool = False
    closing: bool = False
    eof: bool = False
    served: bool = False


def peer_of(sock: socket.socket) -> Peer:
    """The credentials of the process that connected `sock`."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return Peer(*_PEERCRED.unpack(raw))


class _Views:
    """Encoded read responses, rebuilt when `Api.version()` moves."""

    def __init__(self, api: Api) -> None:
        self._api = api
        self._version: int | None = None
        self._cache: dict[tuple[View, bool], bytes] = {}

    def response(self, view: View, keep_alive: bool) -> bytes:
        if view is View.HEALTH:
            return response(200, self._api.health(), keep_alive=keep_alive)
        version = self._api.version()
        if version != self._version:
            self._cache.clear()
            self._version = version
        key = (view, keep_alive)
        if key not in self._cache:
            body = encode_json(getattr(self._api, view.value)())
            self._cache[key] = response_bytes(200, body, keep_alive=keep_alive)
        return self._cache[key]


class ApiServer:
    """Serves `api` on the socket at `path` from a background thread.

    `start()` binds (or adopts the systemd socket) and raises `ListenerError` when it cannot;
    `close()` stops the thread, drops every client and removes the socket file if still ours.
    """

    def __init__(
        self,
        path: str,
        group: str | None,
        api: Api,
        *,
        mode: int = 0o660,
        limits: Limits | None = None,
        clock: Callable[[], float] = time.monotonic,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._path, self._group, self._mode, self._environ = path, group, mode, environ
        self._api = api
        self._listener: Listener | None = None
        self._limits = limits or Limits()
        self._clock = clock
        self._views = _Views(api)
        self._sel = selectors.DefaultSelector()
        self._conns: set[_Conn] = set()
        self._done: deque[tuple[_Conn, bytes, bool]] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="binfmtd-mutate")
        self._thread = threading.Thread(target=self._run, name="binfmtd-api", daemon=True)
        self._stopping = False
        self._now = clock()

    @property
    def path(self) -> str:
        """Where clients connect (the activated socket's own path once started)."""
        return self._listener.path if self._listener else self._path

    def start(self) -> None:
        """Bind or adopt the socket and start serving in the background thread."""
        listener = open_listener(
            self._path, group=self._group, mode=self._mode, environ=self._environ
        )
        self._listener = listener
        self._sel.register(listener.sock, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread.start()
        log.info("api_listening", path=listener.path, activated=listener.activated)

    def close(self) -> None:
        """Stop the loop, drop every connection, and remove the socket file if still ours."""
        self._stopping = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        for conn in list(self._conns):
            self._drop(conn)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        if self._listener is not None:
            self._listener.sock.close()
            self._unlink_if_ours(self._listener)

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _unlink_if_ours(listener: Listener) -> None:
        if listener.identity is None:
            return
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(listener.path)
            if (st.st_dev, st.st_ino) == listener.identity:
                os.unlink(listener.path)

    def _run(self) -> None:
        next_sweep = self._now
        while not self._stopping:
            for key, mask in self._sel.select(timeout=self._limits.sweep_interval):
                self._now = self._clock()
                self._dispatch(key, mask)
            self._now = self._clock()
            if self._now >= next_sweep:
                self._sweep()
                next_sweep = self._now + self._limits.sweep_interval

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        if isinstance(key.data, _Conn):
            self._on_ready(key.data, mask)
        elif key.data == "listen":
            self._accept(cast(socket.socket, key.fileobj))
        elif key.data == "wake":
            self._finish_mutations()

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(64):
            try:
                sock, _addr = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("api_accept_failed", errno=exc.errno)
                return
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if len(self._conns) >= self._limits.max_connections:
            with contextlib.suppress(OSError):
                sock.send(response(503, error_body(503, "too many connections"), keep_alive=False))
            sock.close()
            log.warning("api_connection_rejected", reason="too_many_connections")
            return
        try:
            conn = _Conn(sock, peer_of(sock), mark=self._now)
        except OSError:
            sock.close()
            return
        self._conns.add(conn)
        self._set_interest(conn)

    def _on_ready(self, conn: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if conn in self._conns and mask & selectors.EVENT_READ:
            self._receive(conn)
        if conn in self._conns:
            self._process(conn)

    def _receive(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:
            conn.eof = True
        elif conn.reader.buffered == 0:
            conn.mark = self._now
        conn.reader.feed(data)

    def _process(self, conn: _Conn) -> None:
        """Answer every complete buffered request, in order, until one must wait."""
        drained = consumed = False
        while not (conn.busy or conn.closing) and len(conn.out) < _OUT_HIGH_WATER:
            parsed = conn.reader.next_request()
            if isinstance(parsed, Request):
                self._handle(conn, parsed)
            elif isinstance(parsed, ProtocolError):
                self._reply(conn, parsed.status, error_body(parsed.status, parsed.message), False)
            else:
                drained = True
                break
            consumed = True
        if consumed and conn.reader.buffered:
            conn.mark = self._now
        # A half-closed peer gets answers to what it sent, then we close.
        conn.closing = conn.closing or (conn.eof and drained)
        self._flush(conn)

    def _handle(self, conn: _Conn, request: Request) -> None:
        conn.served = True
        target = route(request)
        if isinstance(target, Reject):
            extra = (("Allow", target.allow),) if target.allow else ()
            body = error_body(target.status, target.message)
            conn.out += response(target.status, body, keep_alive=request.keep_alive, headers=extra)
        elif isinstance(target, Read):
            self._serve_read(conn, target.view, request.keep_alive)
        elif conn.peer.uid != 0:
            message = f"{target.action} needs root; peer uid is {conn.peer.uid}"
            self._reply(conn, 403, error_body(403, message), request.keep_alive)
        else:
            self._start_mutation(conn, target, request.keep_alive)
        conn.closing = conn.closing or not request.keep_alive

    def _reply(self, conn: _Conn, status: int, obj: object, keep_alive: bool) -> None:
        conn.out += response(status, obj, keep_alive=keep_alive)
        conn.closing = conn.closing or not keep_alive

    def _serve_read(self, conn: _Conn, view: View, keep_alive: bool) -> None:
        try:
            conn.out += self._views.response(view, keep_alive)
        except Exception:
            log.exception("api_read_failed", view=str(view))
            self._reply(
                conn, 500, error_body(500, "internal error; see the daemon log"), keep_alive
            )

    def _start_mutation(self, conn: _Conn, mutation: Mutation, keep_alive: bool) -> None:
        conn.busy = True
        future = self._pool.submit(_run_mutation, self._api, mutation, keep_alive)
        future.add_done_callback(lambda done: self._mutation_done(conn, done, keep_alive))

    def _mutation_done(self, conn: _Conn, future: Future[bytes], keep_alive: bool) -> None:
        if not future.cancelled():
            self._done.append((conn, future.result(), keep_alive))
            self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _finish_mutations(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(4096)
        while self._done:
            conn, payload, keep_alive = self._done.popleft()
            if conn in self._conns:
                conn.busy = False
                conn.out += payload
                conn.closing = conn.closing or not keep_alive
                self._process(conn)

    def _flush(self, conn: _Conn) -> None:
        if conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._drop(conn)
                return
            del conn.out[:sent]
            conn.mark = self._now if sent else conn.mark
        if conn.closing and not conn.out and not conn.busy:
            self._drop(conn)
        else:
            self._set_interest(conn)

    def _set_interest(self, conn: _Conn) -> None:
        reading = not (conn.busy or conn.closing or conn.eof) and len(conn.out) < _OUT_HIGH_WATER
        events = (selectors.EVENT_READ if reading else 0) | (
            selectors.EVENT_WRITE if conn.out else 0
        )
        if events == conn.events:
            return
        if conn.events == 0:
            self._sel.register(conn.sock, events, conn)
        elif events == 0:
            self._sel.unregister(conn.sock)
        else:
            self._sel.modify(conn.sock, events, conn)
        conn.events = events

    def _deadline(self, conn: _Conn) -> float:
        limits = self._limits
        if conn.busy:
            return float("inf")
        if conn.out:
            return conn.mark + limits.send_timeout
        if conn.reader.buffered or not conn.served:
            return conn.mark + limits.request_timeout
        return conn.mark + limits.idle_timeout

    def _sweep(self) -> None:
        for conn in [c for c in self._conns if self._deadline(c) <= self._now]:
            if conn.reader.buffered and not conn.out:
                with contextlib.suppress(OSError):
                    message = "request not received in time"
                    conn.sock.send(response(408, error_body(408, message), keep_alive=False))
            self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        if conn.events:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(conn.sock)
        conn.events = 0
        self._conns.discard(conn)
        conn.sock.close()


def _run_mutation(api: Api, mutation: Mutation, keep_alive: bool) -> bytes:
    """Call the api on the worker thread and turn any outcome into a complete response."""
    try:
        result = api.mutate(mutation.action, mutation.arg)
        return response(200, result, keep_alive=keep_alive)
    except ApiError as exc:
        return response(exc.status, error_body(exc.status, exc.message), keep_alive=keep_alive)
    except Exception:
        log.exception("api_mutation_failed", action=str(mutation.action))
        return response(
            500, error_body(500, "internal error; see the daemon log"), keep_alive=keep_alive
        )
