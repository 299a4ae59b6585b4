"""The API socket's file and fd: systemd socket activation or our own bind, and peer credentials.

Socket activation follows sd_listen_fds(3): LISTEN_PID must be ours and LISTEN_FDS >= 1, then fd 3
is the listening socket. Otherwise we bind the path ourselves: a stale socket (nobody listening)
is replaced, a live one is refused, and the file gets its mode and group before it is linked
into place. Client sockets are closed without a reset: unread input is discarded first.
"""

from __future__ import annotations

import contextlib
import grp
import os
import socket
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from binfmtd import log as logs

log = logs.lazy("binfmtd.listener")  # structlog is imported by the first event

SD_LISTEN_FDS_START: Final = 3
MAX_UNIX_PATH: Final = 107
_PEERCRED: Final = struct.Struct("3i")
_RECV_SIZE: Final = 64 * 1024
# How much unread input we swallow before closing, so the close does not become a reset.
DRAIN_LIMIT: Final = 256 * 1024


class ListenerError(RuntimeError):
    """The API socket cannot be set up; the message says why and what to do."""


@dataclass(frozen=True)
class Listener:
    """A listening socket; `identity` is (st_dev, st_ino) of the socket file we created."""

    sock: socket.socket
    path: str
    activated: bool
    identity: tuple[int, int] | None

    def unlink_if_ours(self) -> None:
        """Remove the socket file, unless systemd owns it or someone replaced it since."""
        if self.identity is None:
            return
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self.identity:
                os.unlink(self.path)


@dataclass(frozen=True)
class Peer:
    """Who is on the other end, from SO_PEERCRED at connect time."""

    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    """The credentials of the process that connected `sock`."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return Peer(*_PEERCRED.unpack(raw))


def discard_input(sock: socket.socket, budget: int) -> tuple[int, bool]:
    """Read and drop what the peer sent, without blocking: (bytes read, whether to stop now,
    at EOF, on error or with the budget spent)."""
    total = 0
    while total < budget:
        try:
            data = sock.recv(min(_RECV_SIZE, budget - total))
        except (BlockingIOError, InterruptedError):
            return total, False
        except OSError:
            return total, True
        if not data:
            return total, True
        total += len(data)
    return total, True


def half_close(sock: socket.socket) -> None:
    """Before closing at once: drop unread input (bounded) and send our FIN, so the peer can
    still read what we last sent instead of getting ECONNRESET."""
    discard_input(sock, DRAIN_LIMIT)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


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
