"""The one trust rule for everything the root daemon reads or runs.

A path is trusted when every directory from `/` down and the object itself are owned by root
and not writable by group or others. A sticky directory (like /tmp) is accepted on the way: in
it only the owner of an entry may rename or remove it, and the entry itself is checked too.

Every check happens on an open file descriptor, never on a path that is looked up again later:
each component is opened relative to the already-checked directory above it (openat with
O_NOFOLLOW), then fstat'ed; the caller reads or uses that same descriptor. So no rename or
symlink race can swap what was checked for what is used.

Symbolic links are refused unless the caller allows them (`symlinks=True`); an allowed link
must itself be root-owned and sit in a trusted directory, and its target is walked by the same
rule. Refusals are `TrustError`s whose message names the path and the command that fixes it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator

MAX_SYMLINKS = 40  # as the kernel's own limit on a path lookup
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
DEFAULT_MAX_BYTES = 1 << 20


class TrustError(Exception):
    """A path binfmtd will not read or run, and the command that would make it acceptable.

    `path` is the component that failed the rule (the file itself, or a directory above it).
    """

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


def check_stat(st: os.stat_result, shown: str) -> None:
    """Raise TrustError unless `st` is root-owned and not group/other-writable (sticky dirs ok).

    `shown` is the path named in the message. Use it on an fstat of a descriptor you opened.
    """
    sticky = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if st.st_uid != 0 or (writable and not sticky):
        raise TrustError(
            f"{shown} is writable by a non-root user (owner uid {st.st_uid}, mode "
            f"{stat.filemode(st.st_mode)}); binfmtd runs as root and will not read or run "
            f"anything a user could change: run `chown root: {shown} && chmod go-w {shown}`",
            shown,
        )


def check_fd(fd: int, shown: str) -> os.stat_result:
    """fstat `fd` and apply the rule to it; returns the stat for further checks."""
    st = os.fstat(fd)
    check_stat(st, shown)
    return st


def open_dir(path: str, *, symlinks: bool = False, create_mode: int | None = None) -> int:
    """An O_RDONLY|O_DIRECTORY descriptor of `path`, every component checked (caller closes it).

    With `create_mode`, missing directories are made (mkdirat, that mode, owned by root) and
    then checked like the rest. Raises TrustError, or OSError (ENOENT, ENOTDIR, ...) with the
    path in its filename.
    """
    return _walk(path, want_dir=True, symlinks=symlinks, create_mode=create_mode)


def open_file(path: str, *, symlinks: bool = False) -> int:
    """An O_RDONLY descriptor of the regular file `path`, whole path checked (caller closes it).

    Raises TrustError (untrusted, or not a regular file), or OSError (missing, unreadable).
    """
    return _walk(path, want_dir=False, symlinks=symlinks, create_mode=None)


def read_file(path: str, *, max_bytes: int = DEFAULT_MAX_BYTES, symlinks: bool = False) -> bytes:
    """The bytes of the trusted regular file `path`, read from the descriptor that was checked.

    Raises TrustError also when the file is larger than `max_bytes`.
    """
    fd = open_file(path, symlinks=symlinks)
    try:
        return read_fd(fd, path, max_bytes)
    finally:
        os.close(fd)


def read_fd(fd: int, shown: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Read all of an open file (at most `max_bytes`; more is a TrustError)."""
    chunks = []
    total = 0
    while chunk := os.read(fd, min(1 << 16, max_bytes + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise TrustError(f"{shown} is larger than {max_bytes} bytes; refusing to read it")
    return b"".join(chunks)


def open_file_at(dir_fd: int, name: str, shown: str) -> int:
    """Open the regular file `name` (one component) in the trusted directory `dir_fd`.

    The file itself must pass the rule too. Raises TrustError or OSError.
    """
    _one_component(name, shown)
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise _with_path(exc, shown) from None
    try:
        _check_final(fd, shown, want_dir=False)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_dir(path: str, *, symlinks: bool = False) -> None:
    """Raise TrustError unless the existing directory `path` passes the rule."""
    os.close(open_dir(path, symlinks=symlinks))


def private_dir(parent: str, name: str) -> str:
    """`parent/name`: a root-only (0700) directory, made if missing, under a trusted `parent`.

    An existing one that is not a real directory owned by root with no group/other access is
    refused (TrustError with the fix), never adopted: a user who made it first would own what
    is put in it. `parent` is created (0755) when missing. Returns the path.
    """
    _one_component(name, name)
    shown = os.path.join(parent, name)
    parent_fd = open_dir(parent, create_mode=0o755)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as exc:
            raise _not_private(shown, f"it is not a directory ({exc.strerror})") from None
        try:
            st = os.fstat(fd)
            if st.st_uid != 0 or stat.S_IMODE(st.st_mode) & 0o077:
                raise _not_private(
                    shown, f"owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)}"
                )
        finally:
            os.close(fd)
    finally:
        os.close(parent_fd)
    return shown


def _not_private(shown: str, why: str) -> TrustError:
    return TrustError(
        f"{shown} must be a directory only root can use, but {why}: run `rm -rf {shown}` "
        f"(binfmtd makes it again) or `chown root: {shown} && chmod 700 {shown}`"
    )


# ---------------------------------------------------------------- the walk


def _walk(path: str, *, want_dir: bool, symlinks: bool, create_mode: int | None) -> int:
    if not path.startswith("/"):
        raise TrustError(f"{path!r} must be an absolute path")
    stack = [_open_root()]
    shown = ["/"]
    todo = _parts(path)
    hops = 0
    try:
        while todo:
            name = todo.pop(0)
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                    shown.pop()
                continue
            last = not todo
            here = os.path.join(shown[-1], name)
            create = create_mode if want_dir or not last else None
            target = _link_target(stack[-1], name, here, symlinks, create)
            if target is not None:
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise _with_path(OSError(errno.ELOOP, os.strerror(errno.ELOOP)), path)
                if target.startswith("/"):
                    for fd in stack:
                        os.close(fd)
                    stack, shown = [_open_root()], ["/"]
                todo[:0] = _parts(target)
                continue
            fd = _open_component(stack[-1], name, here, last and not want_dir)
            stack.append(fd)
            shown.append(here)
            _check_final(fd, here, want_dir=want_dir or not last)
        return stack.pop()
    finally:
        for fd in stack:
            os.close(fd)


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def _open_root() -> int:
    fd = os.open("/", _DIR_FLAGS)
    try:
        check_fd(fd, "/")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _link_target(
    dir_fd: int, name: str, shown: str, symlinks: bool, create_mode: int | None
) -> str | None:
    """The target of `name` when it is an allowed symlink; None when it is not a link."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        if create_mode is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), shown) from None
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, create_mode, dir_fd=dir_fd)
        return None
    if not stat.S_ISLNK(st.st_mode):
        return None
    if not symlinks:
        raise TrustError(
            f"{shown} is a symbolic link; binfmtd needs real directories and files here: "
            f"use the path it points to"
        )
    if st.st_uid != 0:
        raise TrustError(
            f"{shown} is a symbolic link owned by uid {st.st_uid}, not root: "
            f"run `chown -h root: {shown}` or use the path it points to"
        )
    return os.readlink(name, dir_fd=dir_fd)


def _open_component(dir_fd: int, name: str, shown: str, is_file: bool) -> int:
    try:
        return os.open(name, _FILE_FLAGS if is_file else _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # became a symlink after we looked: someone raced us
            raise TrustError(f"{shown} changed into a symbolic link while being checked") from None
        raise _with_path(exc, shown) from None


def _check_final(fd: int, shown: str, *, want_dir: bool) -> None:
    st = check_fd(fd, shown)
    if want_dir and not stat.S_ISDIR(st.st_mode):
        raise TrustError(f"{shown} is not a directory")
    if not want_dir and not stat.S_ISREG(st.st_mode):
        raise TrustError(f"{shown} is not a regular file")


def _one_component(name: str, shown: str) -> None:
    if not name or "/" in name or name in (".", ".."):
        raise TrustError(f"{shown!r}: expected a single file name")


def _with_path(exc: OSError, path: str) -> OSError:
    return type(exc)(exc.errno, exc.strerror or os.strerror(exc.errno or 0), path)


@contextlib.contextmanager
def opened_dir(path: str, *, symlinks: bool = False) -> Iterator[int]:
    """`open_dir` as a context manager that closes the descriptor."""
    fd = open_dir(path, symlinks=symlinks)
    try:
        yield fd
    finally:
        os.close(fd)
