"""Namespaces and the few raw syscalls binfmtd needs (unshare, mount), kept in one place.

`enter_sandbox` turns the calling process into root of a new user + mount namespace with a
private binfmt_misc instance (Linux >= 6.7), so nothing it registers reaches the host.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import shutil
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
SANDBOX_MIN_KERNEL = (6, 7)


@functools.cache
def _libc() -> Any:
    """libc, through the process's own symbols: no `ctypes.util.find_library` (it runs
    `ldconfig -p`, ~5 ms), and ctypes is imported only when a mount or unshare needs it."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _errno() -> int:
    import ctypes

    return ctypes.get_errno()


SANDBOX_RUNTIME = "/run/binfmtd-sandbox"
SANDBOX_STATE = "/var/lib/binfmtd-sandbox"
_SANDBOX_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class SandboxError(RuntimeError):
    """The sandbox cannot be made here; the message says why."""


@dataclass(frozen=True)
class SandboxDirs:
    """A named sandbox's own directories on the host: `runtime` (lock, sockets) and `state`
    (installed emulators); both are removed when it exits, so sandboxes run side by side."""

    name: str

    @property
    def runtime(self) -> str:
        """/run/binfmtd-sandbox/NAME."""
        return f"{SANDBOX_RUNTIME}/{self.name}"

    @property
    def state(self) -> str:
        """/var/lib/binfmtd-sandbox/NAME."""
        return f"{SANDBOX_STATE}/{self.name}"

    def remove(self) -> None:
        """Delete both directories, and their parents when no other sandbox uses them."""
        for path in (self.runtime, self.state):
            shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(OSError):  # another sandbox's directory is still there
                os.rmdir(os.path.dirname(path))


def sweep_stale_oneshots() -> list[str]:
    """Remove the directories of `oneshot-PID` sandboxes nobody holds any more (a run killed
    with SIGKILL, or a power cut): PID is gone and the lock in its runtime directory is free.
    Returns the names removed; errors are ignored (the next run tries again)."""
    import fcntl

    names: set[str] = set()
    for parent in (SANDBOX_RUNTIME, SANDBOX_STATE):
        with contextlib.suppress(OSError):
            names.update(n for n in os.listdir(parent) if re.fullmatch(r"oneshot-[0-9]+", n))
    removed = []
    for name in sorted(names):
        if os.path.exists(f"/proc/{name.removeprefix('oneshot-')}"):
            continue  # alive (or the pid was reused: left for a later run)
        dirs = SandboxDirs(name)
        try:
            fd = os.open(f"{dirs.runtime}/binfmtd.lock", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = -1
        except OSError:
            continue
        try:
            if fd >= 0:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            dirs.remove()
            removed.append(name)
        except OSError:
            continue  # held: a live run
        finally:
            if fd >= 0:
                os.close(fd)
    return removed


def sandbox_name(text: str) -> str:
    """Check a --sandbox=NAME: letters, digits, `_.-`, at most 64, not starting with `.`/`-`."""
    if not _SANDBOX_NAME.fullmatch(text):
        raise ValueError(
            f"bad sandbox name {text!r}: use letters, digits, '_', '.', '-' (at most 64), "
            "starting with a letter or digit"
        )
    return text


def default_sandbox_name(*, oneshot: bool, pid: int) -> str:
    """A bare --sandbox: `oneshot-PID` for a one-shot run (the demo never collides with a
    daemon), `default` for a daemon (a second one is refused and told to name itself)."""
    return f"oneshot-{pid}" if oneshot else "default"


def _check(result: int, what: str) -> None:
    if result != 0:
        err = _errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str, flags: int = 0) -> None:
    """mount(2)."""
    res = _libc().mount(source.encode(), target.encode(), fstype.encode(), flags, None)
    _check(res, f"mount {fstype} on {target}")


def make_private(path: str = "/") -> None:
    """Stop mount events propagating back to the parent namespace."""
    res = _libc().mount(None, path.encode(), None, MS_REC | MS_PRIVATE, None)
    _check(res, f"make {path} private")


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of a kernel release string such as 6.18.44-fc."""
    parts = (release or os.uname().release).split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def enter_sandbox(binfmt_root: str, keep_gids: Iterable[int] = ()) -> None:
    """Unshare user+mount namespaces, map ourselves to root, mount a private binfmt_misc.

    As real root on the host, uids and gids 0-65535 are mapped to themselves (`id_maps`), so
    a container runtime inside (runc under the BuildKit worker) can chown, mount devpts with
    gid=5 and switch to any user of an image; `keep_gids` above that range (socket groups) are
    added one by one, so sockets made inside carry the host's group and SO_PEERCRED reports
    the host's ids. Only a process with CAP_SETUID/CAP_SETGID in the parent namespace may
    write such maps: a helper forked before the unshare writes them. Anyone else gets root
    mapped to itself only, which runs the probes but no containers.
    """
    if threading.active_count() > 1:
        raise SandboxError("internal: the sandbox must be entered before any thread starts")
    uid, gid = os.geteuid(), os.getegid()
    full = uid == 0 and not in_user_namespace()
    mapper = _fork_mapper(*id_maps(sorted(set(keep_gids)))) if full else None
    if _libc().unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
        err = _errno()
        if mapper is not None:
            _finish_mapper(*mapper, go=False)
        raise SandboxError(
            f"cannot create a user namespace ({os.strerror(err)}): check "
            "kernel.unprivileged_userns_clone / user.max_user_namespaces"
        )
    if mapper is not None:
        _finish_mapper(*mapper, go=True)
    else:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {uid} 1")
        _write("/proc/self/gid_map", f"0 {gid} 1")
    make_private("/")
    try:
        mount("binfmt_misc", binfmt_root, "binfmt_misc")
    except OSError as exc:
        release = os.uname().release
        if exc.errno in (errno.EPERM, errno.EACCES) and kernel_version() < SANDBOX_MIN_KERNEL:
            raise SandboxError(
                f"private binfmt_misc instances need Linux >= 6.7; this kernel is {release}"
            ) from None
        raise SandboxError(f"cannot mount a private binfmt_misc on {binfmt_root}: {exc}") from None


MAPPED_IDS = 65536  # the ids every container image expects (nobody is 65534)


def id_maps(keep_gids: Iterable[int] = (), size: int = MAPPED_IDS) -> tuple[str, str]:
    """(uid_map, gid_map) texts: ids 0..size-1 onto themselves, plus each kept gid above them.

    >>> id_maps([5, 70000])
    ('0 0 65536', '0 0 65536\n70000 70000 1')
    """
    extra = sorted({g for g in keep_gids if g >= size})
    gid_lines = [f"0 0 {size}", *(f"{g} {g} 1" for g in extra)]
    return f"0 0 {size}", "\n".join(gid_lines)


def _fork_mapper(uid_map: str, gid_map: str) -> tuple[int, int]:
    """A child that stays in the parent namespaces and writes our maps once told to."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only writes two files and exits
        code = 1
        try:
            os.close(write_end)
            if os.read(read_end, 1) == b"1":
                parent = os.getppid()
                _write(f"/proc/{parent}/uid_map", uid_map)
                _write(f"/proc/{parent}/gid_map", gid_map)
                code = 0
        finally:
            os._exit(code)
    os.close(read_end)
    return pid, write_end


def _finish_mapper(pid: int, write_end: int, *, go: bool) -> None:
    os.write(write_end, b"1" if go else b"0")
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    if go and status != 0:
        raise SandboxError("cannot write the uid/gid maps of the sandbox's user namespace")


def in_user_namespace() -> bool:
    """Whether this process runs in a user namespace other than the initial one."""
    try:
        with open("/proc/self/uid_map", encoding="ascii") as handle:
            first = handle.read().split()
    except OSError:
        return False
    return first[:3] != ["0", "0", "4294967295"]


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="ascii") as handle:
        handle.write(text)
