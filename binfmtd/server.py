"""The daemon's Unix-socket API: HTTP/1.1 + JSON, so `curl --unix-socket` works.

One `selectors` loop in a background thread serves every connection with non-blocking sockets,
so the reconcile loop is never blocked by a client and one slow or hostile client cannot stall
the others. Reads are served from memory: encoded bodies are cached per `Api.version()`
(`routes.ViewCache`).
Mutations run one at a time on a worker thread; the loop keeps serving while they run.
Who may do what is decided by the peer's credentials (SO_PEERCRED): anyone who can connect
may read (the socket's 0660 root:<group> mode limits that), only uid 0 may mutate.
Fairness: `Limits.root_reserved` of the `max_connections` slots are kept for root, and each
other uid may hold at most `Limits.per_uid` connections, so no local user can crowd root out.
HTTP is h11's (`protocol`), routing `routes`, binding the socket `listener`.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, cast

from binfmtd import log as logs
from binfmtd import wire
from binfmtd.listener import (
    DRAIN_LIMIT,
    Listener,
    Peer,
    discard_input,
    half_close,
    open_listener,
    peer_of,
)
from binfmtd.protocol import (
    Connection,
    ProtocolError,
    Replay,
    Request,
    encode_json,
    error_body,
)
from binfmtd.routes import OTHER, Mutation, Read, Reject, View, ViewCache, route, to_json

log = logs.lazy("binfmtd.server")  # structlog is imported by the first event

_RECV_SIZE: Final = 64 * 1024
_OUT_HIGH_WATER: Final = 256 * 1024
IOV_CHUNKS: Final = 64  # pieces per sendmsg(2), far below IOV_MAX (1024)
METRICS_TYPE: Final = b"text/plain; version=0.0.4; charset=utf-8"
INTERNAL_ERROR: Final = "internal error; see the daemon log"


class Api(Protocol):
    """What the daemon implements. Read methods run on the server thread: they must be cheap
    and thread-safe (return an immutable snapshot). `version()` must change after any read
    view changes (bump it after publishing the new snapshot). `health()` is never cached."""

    def version(self) -> int: ...
    def status(self) -> wire.StatusRecord | Mapping[str, Any]: ...
    def platforms(self) -> wire.PlatformsRecord | Mapping[str, Any]: ...
    def platforms_binfmt(self) -> wire.BinfmtRecord | Mapping[str, Any]: ...
    def health(self) -> wire.HealthRecord | Mapping[str, Any]: ...
    def worker(self) -> wire.WorkerRecord | Mapping[str, Any]: ...
    def metrics(self) -> bytes: ...
    def mutate(self, action: str, arg: dict[str, Any]) -> wire.Record | Mapping[str, Any]: ...


Observer = Callable[[str, int], None]
"""Called once per answered request with (endpoint template, HTTP status)."""


@dataclass(frozen=True)
class Limits:
    """Per-connection budgets, in seconds; the connection cap, the slots only root may use,
    and how many connections one non-root uid may hold."""

    max_connections: int = 512
    root_reserved: int = 32
    per_uid: int = 64
    request_timeout: float = 5.0
    idle_timeout: float = 30.0
    send_timeout: float = 5.0
    sweep_interval: float = 0.25


class _Outbox:
    """Answers waiting to be sent, kept as the pieces they were made of (a status body of about
    18 KB is then copied once, by the kernel, rather than joined and buffered here first)."""

    __slots__ = ("_chunks", "_size")

    def __init__(self) -> None:
        self._chunks: deque[memoryview] = deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, parts: list[bytes]) -> None:
        for part in parts:
            if part:
                self._chunks.append(memoryview(part))
                self._size += len(part)

    def send(self, sock: socket.socket) -> int:
        """One sendmsg(2) of what is queued (up to IOV_CHUNKS pieces); drops what was sent."""
        chunks = self._chunks
        sent = sock.sendmsg(chunks if len(chunks) <= IOV_CHUNKS else list(chunks)[:IOV_CHUNKS])
        self._size -= sent
        left = sent
        while left:
            head = chunks[0]
            if len(head) > left:
                chunks[0] = head[left:]
                break
            left -= len(head)
            chunks.popleft()
        return sent


@dataclass(eq=False)
class _Conn:
    """One client. `mark` is when the running deadline started: the request's first byte,
    the last send progress, the end of the last response (keep-alive idle), or the half-close
    after the last response (`lingering`: we only discard input until the client's EOF)."""

    sock: socket.socket
    peer: Peer
    mark: float
    http: Connection = field(default_factory=Connection)
    out: _Outbox = field(default_factory=_Outbox)
    events: int = 0
    busy: bool = False
    closing: bool = False
    eof: bool = False
    served: bool = False
    lingering: bool = False
    discarded: int = 0


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
        observe: Observer | None = None,
    ) -> None:
        self._path, self._group, self._mode, self._environ = path, group, mode, environ
        self._observe = observe
        self._api = api
        self._listener: Listener | None = None
        self._limits = limits or Limits()
        self._clock = clock
        self._views = ViewCache(api)
        self._replay = Replay()
        self._sel = selectors.DefaultSelector()
        self._conns: set[_Conn] = set()
        self._per_uid: dict[int, int] = {}
        self._done: deque[tuple[_Conn, int, bytes, str, bool]] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        # Both ends non-blocking: draining the wake-up byte must never wait for one (the loop
        # drains once more on its way out, when the byte may already have been read).
        self._wake_r.setblocking(False)
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
        """Stop the loop, drop every connection, and remove the socket file if still ours.

        Mutations already answered (at stop, with 503) are sent first: the pool is drained
        before the loop is told to stop, and the loop flushes what is queued on its way out.
        """
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._stopping = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        # Mutations still in flight were answered by the daemon's stop (503): send those
        # answers before dropping the connections, or a client sees none at all.
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._send_finished()
        for conn in list(self._conns):
            self._drop(conn)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        if self._listener is not None:
            self._listener.sock.close()
            self._listener.unlink_if_ours()

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        self._finish_mutations()  # best effort, non-blocking: answers queued before the stop
        for conn in list(self._conns):
            self._flush(conn)

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
        try:
            peer = peer_of(sock)
        except OSError:
            sock.close()
            return
        refusal = self._refusal(peer.uid)
        if refusal is not None:
            _refuse(sock, 503, refusal)
            sock.close()
            log.warning("api_connection_rejected", reason=refusal, uid=peer.uid)
            return
        conn = _Conn(sock, peer, mark=self._now, http=Connection(self._replay))
        self._conns.add(conn)
        self._per_uid[peer.uid] = self._per_uid.get(peer.uid, 0) + 1
        self._set_interest(conn)

    def _refusal(self, uid: int) -> str | None:
        """Why a new connection from `uid` is refused, or None: root may use every slot,
        others leave `root_reserved` free and hold at most `per_uid` each."""
        limits, total = self._limits, len(self._conns)
        if total >= limits.max_connections:
            return "too many connections"
        if uid == 0:
            return None
        if total >= limits.max_connections - limits.root_reserved:
            return "too many connections (the remaining slots are reserved for root)"
        if self._per_uid.get(uid, 0) >= limits.per_uid:
            return f"too many connections from uid {uid} (at most {limits.per_uid})"
        return None

    def _on_ready(self, conn: _Conn, mask: int) -> None:
        if conn.lingering:
            self._linger(conn)
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if self._serving(conn) and mask & selectors.EVENT_READ:
            self._receive(conn)
        if self._serving(conn):
            self._process(conn)

    def _serving(self, conn: _Conn) -> bool:
        return conn in self._conns and not conn.lingering

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
        elif conn.http.buffered == 0:
            conn.mark = self._now
        conn.http.feed(data)

    def _process(self, conn: _Conn) -> None:
        """Answer every complete buffered request, in order, until one must wait."""
        drained = consumed = False
        while not (conn.busy or conn.closing) and len(conn.out) < _OUT_HIGH_WATER:
            parsed = conn.http.next_request()
            if isinstance(parsed, Request):
                self._handle(conn, parsed)
            elif isinstance(parsed, ProtocolError):
                self._send(conn, parsed.status, error_body(parsed.status, parsed.message), False)
            else:
                drained = True
                break
            consumed = True
        if consumed and conn.http.buffered:
            conn.mark = self._now
        # A half-closed peer gets answers to what it sent, then we close.
        conn.closing = conn.closing or (conn.eof and drained)
        self._flush(conn)

    def _handle(self, conn: _Conn, request: Request) -> None:
        conn.served = True
        target = route(request)
        alive = request.keep_alive
        if isinstance(target, Reject):
            extra = (("Allow", target.allow),) if target.allow else ()
            body = error_body(target.status, target.message)
            self._send(conn, target.status, body, alive, extra, target.endpoint)
        elif isinstance(target, Read):
            self._serve_read(conn, target, alive)
        elif conn.peer.uid != 0:
            message = f"{target.action} needs root; peer uid is {conn.peer.uid}"
            self._send(conn, 403, error_body(403, message), alive, endpoint=target.endpoint)
        else:
            self._start_mutation(conn, target, alive)

    def _send(
        self,
        conn: _Conn,
        status: int,
        body: bytes,
        keep_alive: bool,
        headers: tuple[tuple[str, str], ...] = (),
        endpoint: str = OTHER,
        content_type: bytes | None = None,
    ) -> None:
        """Queue one answer through h11; close after it unless both sides keep the connection."""
        kind = {} if content_type is None else {"content_type": content_type}
        conn.out.add(
            conn.http.respond_parts(status, body, keep_alive=keep_alive, headers=headers, **kind)
        )
        conn.closing = conn.closing or not keep_alive or not conn.http.open
        if self._observe is not None:
            self._observe(endpoint, status)

    def _serve_read(self, conn: _Conn, target: Read, keep_alive: bool) -> None:
        try:
            body = self._views.body(target.view)
        except Exception:
            log.exception("api_read_failed", view=str(target.view))
            self._send(conn, 500, error_body(500, INTERNAL_ERROR), keep_alive, (), target.endpoint)
            return
        kind = METRICS_TYPE if target.view is View.METRICS else None
        self._send(conn, 200, body, keep_alive, (), target.endpoint, kind)

    def _start_mutation(self, conn: _Conn, mutation: Mutation, keep_alive: bool) -> None:
        conn.busy = True
        future = self._pool.submit(_run_mutation, self._api, mutation)
        future.add_done_callback(
            lambda done: self._mutation_done(conn, done, mutation.endpoint, keep_alive)
        )

    def _mutation_done(
        self, conn: _Conn, future: Future[tuple[int, bytes]], endpoint: str, keep_alive: bool
    ) -> None:
        if not future.cancelled():
            status, body = future.result()
            self._done.append((conn, status, body, endpoint, keep_alive))
            self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _send_finished(self) -> None:
        """At close: write the answers of finished mutations, best effort (one send each)."""
        while self._done:
            conn, status, body, endpoint, _keep_alive = self._done.popleft()
            if conn in self._conns:
                conn.busy = False
                self._send(conn, status, body, False, (), endpoint)
                self._flush(conn)

    def _finish_mutations(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(4096)
        while self._done:
            conn, status, body, endpoint, keep_alive = self._done.popleft()
            if conn in self._conns:
                conn.busy = False
                self._send(conn, status, body, keep_alive, (), endpoint)
                self._process(conn)

    def _flush(self, conn: _Conn) -> None:
        if conn.out:
            try:
                sent = conn.out.send(conn.sock)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._drop(conn)
                return
            conn.mark = self._now if sent else conn.mark
        if conn.closing and not conn.out and not conn.busy:
            self._linger(conn)
        else:
            self._set_interest(conn)

    def _linger(self, conn: _Conn) -> None:
        """Half-close after the last response, then discard input until the client's EOF.

        Closing a socket with unread input makes the kernel reset the connection, and the
        client then gets ECONNRESET instead of our (error) response. Bounded by DRAIN_LIMIT
        and request_timeout."""
        if not conn.lingering:
            conn.lingering, conn.mark = True, self._now
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
        read, finished = discard_input(conn.sock, DRAIN_LIMIT - conn.discarded)
        conn.discarded += read
        if finished:
            self._drop(conn)
        else:
            self._set_interest(conn)

    def _set_interest(self, conn: _Conn) -> None:
        reading = conn.lingering or (
            not (conn.busy or conn.closing or conn.eof) and len(conn.out) < _OUT_HIGH_WATER
        )
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
        if conn.lingering or conn.http.buffered or not conn.served:
            return conn.mark + limits.request_timeout
        return conn.mark + limits.idle_timeout

    def _sweep(self) -> None:
        for conn in [c for c in self._conns if self._deadline(c) <= self._now]:
            if conn.http.buffered and not conn.out and not conn.lingering:
                _refuse(conn.sock, 408, "request not received in time")
            self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        if conn.events:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(conn.sock)
        conn.events = 0
        if conn in self._conns:
            self._conns.discard(conn)
            left = self._per_uid.pop(conn.peer.uid, 1) - 1
            if left:
                self._per_uid[conn.peer.uid] = left
        conn.sock.close()


def _refuse(sock: socket.socket, status: int, message: str) -> None:
    """Answer with an error in one best-effort send, then half-close before the caller closes."""
    answer = Connection().respond(status, error_body(status, message), keep_alive=False)
    with contextlib.suppress(OSError):
        sock.send(answer)
    half_close(sock)


def _run_mutation(api: Api, mutation: Mutation) -> tuple[int, bytes]:
    """Call the api on the worker thread: (status, encoded body) for any outcome."""
    try:
        return 200, encode_json(to_json(api.mutate(mutation.action, mutation.arg)))
    except wire.ApiError as exc:
        return exc.status, error_body(exc.status, exc.message)
    except Exception:
        log.exception("api_mutation_failed", action=str(mutation.action))
        return 500, error_body(500, INTERNAL_ERROR)
