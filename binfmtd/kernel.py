"""The only module that touches binfmt_misc. Every method takes paths under `root`.

Errors are turned into `KernelError` with a hint the operator can act on, at this boundary.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from binfmtd.binfmt import Entry, FormatError, Registration, parse_entry

_HINTS = {
    errno.ENOENT: "is binfmt_misc mounted there, and does the interpreter exist?",
    errno.EEXIST: "an entry with that name exists already: remove it first",
    errno.EINVAL: "the kernel rejected the line (bad field, or a flag this kernel lacks)",
    errno.EACCES: "permission denied: binfmtd must run as root (in its user namespace)",
    errno.EPERM: "operation not permitted: binfmtd must run as root (in its user namespace)",
    errno.ENOEXEC: "the interpreter is not an executable this kernel can load",
    errno.ENOSPC: "no space left",
    errno.ENOTDIR: "is binfmt_misc mounted there?",
    errno.ENODEV: "binfmt_misc is not available in this kernel: load the binfmt_misc module",
}


class KernelError(OSError):
    """A binfmt_misc operation that failed, with the errno and a hint."""

    def __init__(self, action: str, err: int, detail: str = "", hint: str | None = None) -> None:
        hint = hint or _HINTS.get(err, os.strerror(err))
        text = f"{action} failed: {errno.errorcode.get(err, str(err))} ({hint})"
        super().__init__(err, text + (f"; {detail}" if detail else ""))
        self.action = action


@dataclass(frozen=True)
class Snapshot:
    """Everything read from an instance in one pass: parsed entries (newest first, the order
    the kernel tries them in) and unreadable ones."""

    enabled: bool
    entries: dict[str, Entry]
    broken: dict[str, str]


class BinfmtMisc:
    """One binfmt_misc instance, found at `root`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._register_path = str(self.root / "register")
        self._batching = False
        self._register_fd = -1

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Registrations in the block share one open(2) of `register`, made on first use."""
        self._batching = True
        try:
            yield
        finally:
            self._batching = False
            if self._register_fd >= 0:
                os.close(self._register_fd)
            self._register_fd = -1

    def is_mounted(self) -> bool:
        """Whether a binfmt_misc filesystem (not an automount point) sits at root."""
        return mount_type(self.root) == "binfmt_misc"

    def mount(self) -> None:
        """Mount binfmt_misc at root (the directory must exist)."""
        from binfmtd import ns

        try:
            ns.mount("binfmt_misc", str(self.root), "binfmt_misc")
        except OSError as exc:
            raise KernelError(f"mount binfmt_misc on {self.root}", exc.errno or 0) from None

    def status_enabled(self) -> bool:
        """Whether the instance as a whole is enabled."""
        return self._read("status").strip() == "enabled"

    def snapshot(self) -> Snapshot:
        """Read every entry; a malformed or vanished one is reported, not raised."""
        enabled = self.status_enabled()
        entries: dict[str, Entry] = {}
        broken: dict[str, str] = {}
        for name in self._names():
            try:
                text, ident = self._read_entry(name)
                entries[name] = replace(parse_entry(name, text), ident=ident)
            except FileNotFoundError:
                continue
            except (FormatError, OSError) as exc:
                broken[name] = str(exc)
        return Snapshot(enabled, entries, broken)

    def read(self, name: str) -> Entry | None:
        """One entry, or None when it does not exist."""
        try:
            return parse_entry(name, self._read(name))
        except FileNotFoundError:
            return None

    def register(self, reg: Registration) -> None:
        """Write `reg` to register in a single write(2). A refusal to open the interpreter
        (EACCES: with F the kernel opens it for execution at once) names the interpreter's
        own problem (a noexec mount, not an executable file) when it has one."""
        try:
            self._register(reg)
        except KernelError as exc:
            why = _interpreter_problem(reg.interpreter) if exc.errno == errno.EACCES else None
            if why is None:
                raise
            raise KernelError(exc.action, errno.EACCES, hint=why) from None

    def _register(self, reg: Registration) -> None:
        fd = self._register_fd  # open only inside batch(): the flush repair's path first
        if fd < 0:
            if not self._batching:
                self._write("register", reg.register_string(), f"register {reg.name}")
                return
            try:
                fd = self._register_fd = os.open(self._register_path, os.O_WRONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise KernelError(f"register {reg.name}", exc.errno or 0) from None
        data = reg.register_bytes
        try:
            written = os.write(fd, data)
        except OSError as exc:
            raise _write_error(exc, reg.register_string(), f"register {reg.name}") from None
        if written != len(data):
            raise KernelError(f"register {reg.name}", errno.EIO, f"short write {written}")

    def set_enabled(self, name: str, enabled: bool) -> None:
        """Enable or disable one entry."""
        self._write(name, "1" if enabled else "0", f"{'enable' if enabled else 'disable'} {name}")

    def remove(self, name: str) -> None:
        """Remove one entry (-1 to the entry, never to `status`)."""
        if name in {"status", "register"} or "/" in name:
            raise ValueError(f"refusing to remove {name!r}")
        self._write(name, "-1", f"remove {name}")

    def ident(self, name: str) -> int | None:
        """The inode of entry `name` (new for every registration), or None when it is gone."""
        try:
            return os.stat(self.root / name).st_ino
        except OSError:
            return None

    def _names(self) -> list[str]:
        try:
            # Directory order is the kernel's: newest entry first, the order it tries them in.
            return [n for n in os.listdir(self.root) if n not in {"register", "status"}]
        except OSError as exc:
            raise KernelError(f"list {self.root}", exc.errno or 0) from None

    def _read_entry(self, name: str) -> tuple[str, int]:
        """An entry's text and its inode, from one open."""
        with open(self.root / name, encoding="latin-1") as handle:
            return handle.read(), os.fstat(handle.fileno()).st_ino

    def _read(self, name: str) -> str:
        try:
            with open(self.root / name, encoding="latin-1") as handle:
                return handle.read()
        except FileNotFoundError:
            if name == "status":
                raise KernelError(f"read {self.root}/status", errno.ENOENT) from None
            raise

    def _write(self, name: str, text: str, action: str) -> None:
        try:
            fd = os.open(self.root / name, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise KernelError(action, exc.errno or 0) from None
        try:
            self._write_fd(fd, text, action)
        finally:
            os.close(fd)

    @staticmethod
    def _write_fd(fd: int, text: str, action: str) -> None:
        data = text.encode("latin-1")
        try:
            written = os.write(fd, data)
        except OSError as exc:
            raise _write_error(exc, text, action) from None
        if written != len(data):
            raise KernelError(action, errno.EIO, f"short write {written}/{len(data)}")


def _interpreter_problem(path: str) -> str | None:
    """Why the kernel may not open `path` for execution, as the operator can fix it; None
    when nothing about the file explains a refusal."""
    try:
        st = os.stat(path)
        vfs = os.statvfs(path)
    except OSError as exc:
        return f"the interpreter {path} cannot be reached: {exc.strerror}"
    if vfs.f_flag & os.ST_NOEXEC:
        return (
            f"the interpreter {path} is on a filesystem mounted noexec, and the kernel opens it "
            "for execution (F flag): mount it without noexec, or choose an install_dir on "
            "another filesystem"
        )
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
        return f"the interpreter {path} is not an executable file ({stat.filemode(st.st_mode)})"
    return None


def _write_error(exc: OSError, text: str, action: str) -> KernelError:
    """The KernelError for a failed write; EINVAL shows the line the kernel rejected."""
    detail = f"line: {text!r}" if exc.errno == errno.EINVAL else ""
    return KernelError(action, exc.errno or 0, detail)


def mount_type(path: Path) -> str | None:
    """The filesystem type mounted exactly at `path` (the last mount wins), per mountinfo."""
    target = os.path.realpath(path)
    found: str | None = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as handle:
            for line in handle:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) > 4 and _unescape(fields[4]) == target:
                    found = right.split()[0] if right else None
    except OSError:
        return None
    return found


def _unescape(text: str) -> str:
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        text = text.replace(code, char)
    return text
