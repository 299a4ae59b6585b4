"""The lock that keeps two binfmtd processes off the same install directory and instance."""

from __future__ import annotations

import fcntl
import os

from binfmtd import trust
from binfmtd.ns import SandboxDirs
from binfmtd.preflight import Exit, PreflightError


class Lock:
    """One binfmtd (daemon or --oneshot) per lock file and per install directory.

    The install directory is locked too (flock on its descriptor), so a second daemon whose
    configuration names another lock file still cannot work on the same emulators and entries.
    """

    def __init__(
        self, path: str, install_dir: str | None = None, *, sandbox: str | None = None
    ) -> None:
        self.path = path
        self.install_dir = install_dir
        self.sandbox = sandbox  # the --sandbox name: the refusal names it, not systemctl
        self.fd = -1
        self.dir_fd = -1

    def acquire(self) -> None:
        """Take both locks; PreflightError ALREADY_RUNNING when another binfmtd holds one,
        CONFIG when the lock file cannot be made or opened (a directory, a running program,
        a read-only filesystem: before, a traceback)."""
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise PreflightError(
                Exit.CONFIG,
                f"lock_file {self.path}: cannot open it: {exc.strerror} "
                f"({exc.filename or self.path}); name a file of binfmtd's own in a "
                "directory root can write (the default is /run/binfmtd/binfmtd.lock)",
            ) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").split()
            os.close(self.fd)
            raise PreflightError(Exit.ALREADY_RUNNING, self._refusal(*holder[:2])) from None
        os.ftruncate(self.fd, 0)
        # "PID [SANDBOX]": a refused binfmtd names the holder, a sandbox by its name.
        os.pwrite(self.fd, f"{os.getpid()} {self.sandbox or ''}".strip().encode() + b"\n", 0)
        self._lock_install_dir()

    def _lock_install_dir(self) -> None:
        if self.install_dir is None:
            return
        try:
            self.dir_fd = trust.open_dir(self.install_dir, create_mode=0o755)
        except (trust.TrustError, OSError):
            return  # the install step reports why the directory is unusable, per arch
        try:
            fcntl.flock(self.dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.release()
            raise PreflightError(
                Exit.ALREADY_RUNNING,
                f"another binfmtd works on {self.install_dir} (with a lock file other than "
                f"{self.path}); run one binfmtd per install directory: stop the other first",
            ) from None

    def _refusal(self, pid: str = "?", sandbox: str | None = None) -> str:
        what = f"another binfmtd (pid {pid}) holds {self.path}"
        if sandbox is None:
            return (
                f"{what}; while a daemon runs, use `binfmtctl reconcile` / `binfmtctl verify`, "
                "or stop it first (`systemctl stop binfmtd`)"
            )
        # Only a lock in the sandbox's own directory is freed by choosing another name.
        named = os.path.dirname(self.path) == SandboxDirs(sandbox).runtime
        return (
            f"{what}: it is sandbox {sandbox!r} (binfmtd --sandbox={sandbox}); while it runs, "
            f"use `binfmtctl reconcile` / `binfmtctl verify` on its socket, or stop it first "
            f"(kill {pid})"
            + (", or run this one under another name (--sandbox=NAME)" if named else "")
        )

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1
