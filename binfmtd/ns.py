"""Namespaces and the few raw syscalls binfmtd needs (unshare, mount), kept in one place.

`enter_sandbox` turns the calling process into root of a new user + mount namespace with a
private binfmt_misc instance (Linux >= 6.7), so nothing it registers reaches the host.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import threading

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
SANDBOX_MIN_KERNEL = (6, 7)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class SandboxError(RuntimeError):
    """The sandbox cannot be made here; the message says why."""


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str, flags: int = 0) -> None:
    """mount(2)."""
    res = _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, None)
    _check(res, f"mount {fstype} on {target}")


def make_private(path: str = "/") -> None:
    """Stop mount events propagating back to the parent namespace."""
    res = _libc.mount(None, path.encode(), None, MS_REC | MS_PRIVATE, None)
    _check(res, f"make {path} private")


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of a kernel release string such as 6.18.44-fc."""
    parts = (release or platform.release()).split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def enter_sandbox(binfmt_root: str) -> None:
    """Unshare user+mount namespaces, map ourselves to root, mount a private binfmt_misc."""
    if threading.active_count() > 1:
        raise SandboxError("internal: the sandbox must be entered before any thread starts")
    uid, gid = os.geteuid(), os.getegid()
    if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise SandboxError(
            f"cannot create a user namespace ({os.strerror(err)}): check "
            "kernel.unprivileged_userns_clone / user.max_user_namespaces"
        )
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"0 {uid} 1")
    _write("/proc/self/gid_map", f"0 {gid} 1")
    make_private("/")
    try:
        mount("binfmt_misc", binfmt_root, "binfmt_misc")
    except OSError as exc:
        release = platform.release()
        if exc.errno in (errno.EPERM, errno.EACCES) and kernel_version() < SANDBOX_MIN_KERNEL:
            raise SandboxError(
                f"private binfmt_misc instances need Linux >= 6.7; this kernel is {release}"
            ) from None
        raise SandboxError(f"cannot mount a private binfmt_misc on {binfmt_root}: {exc}") from None


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
