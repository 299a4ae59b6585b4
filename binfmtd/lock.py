"""The lock that keeps two binfmtd processes off the same install directory and instance."""

from __future__ import annotations

import fcntl
import os

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
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise PreflightError(Exit.ALREADY_RUNNING, self._refusal(holder)) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def _refusal(self, holder: str) -> str:
        if self.sandbox is not None:
            return (
                f"sandbox {self.sandbox!r} is in use: binfmtd --sandbox={self.sandbox} (pid "
                f"{holder}) holds {self.path}; give this run another name (--sandbox=NAME) or "
                f"stop that one (kill {holder})"
            )
        return (
            f"another binfmtd (pid {holder}) holds {self.path}; while a daemon runs, use "
            "`binfmtctl reconcile` / `binfmtctl verify`, or stop it first "
            "(`systemctl stop binfmtd`)"
        )

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
