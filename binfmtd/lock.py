"""The lock that keeps two binfmtd processes off the same install directory and instance."""

from __future__ import annotations

import fcntl
import os

from binfmtd.ns import SandboxDirs
from binfmtd.preflight import Exit, PreflightError


class Lock:
    """One binfmtd (daemon or --oneshot) per lock file: a second one is refused, clearly."""

    def __init__(self, path: str, sandbox: str | None = None) -> None:
        self.path = path
        self.sandbox = sandbox  # the --sandbox name: the refusal names it, not systemctl
        self.fd = -1

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").split()
            os.close(self.fd)
            raise PreflightError(Exit.ALREADY_RUNNING, self._refusal(*holder[:2])) from None
        os.ftruncate(self.fd, 0)
        # "PID [SANDBOX]": a refused binfmtd names the holder, a sandbox by its name.
        os.pwrite(self.fd, f"{os.getpid()} {self.sandbox or ''}".strip().encode() + b"\n", 0)

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
