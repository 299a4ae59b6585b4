"""The probe runner: a small process, chrooted into the probe stage, that starts probes on request.

Why a process of its own: a probe must run from a root holding nothing but probes, so only an
entry with the F flag (interpreter opened at registration) can run it. Starting
`chroot ROOT /probe` for each probe costs a dynamic executable's start (about 0.8 ms of CPU,
a fifth of a probe), and forking the multi-threaded daemon to chroot is not safe. This process
chroots itself once and then starts each probe with posix_spawn (vfork and exec: no copy of its
memory). It imports nothing but the standard library, runs with `python -I -S`, and is started
and read only by `binfmtd.probe.Stage`.

Protocol (pipes; one runner per stage; numbers in ASCII decimal):
  request, on stdin:  "ID TIMEOUT_MS NAME\\n"    NAME: a file name in the stage (no "/")
  reply, on stdout:   "ID RC TIMED_OUT DURATION_US ERRNO OUT_LEN ERR_LEN\\n" OUT ERR
    RC: exit status, or -N when killed by signal N; ERRNO: 0, or why posix_spawn failed (then
    ERR holds strerror and RC is -1). OUT and ERR are cut at OUTPUT_CAP bytes each.
End of stdin (the daemon closed it or died): running probes are killed, then the runner exits.
argv: STAGE_FD (an O_DIRECTORY descriptor of the stage, inherited) WORKERS (probes at once).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import sys
import time
from collections import deque

OUTPUT_CAP = 64 * 1024
PR_SET_THP_DISABLE = 41  # <linux/prctl.h>


class _Job:
    """One running probe (a plain class: importing dataclasses would slow the runner's start)."""

    def __init__(
        self, ident: str, pid: int, deadline: float, started: float, out_fd: int, err_fd: int
    ) -> None:
        self.ident, self.pid, self.started = ident, pid, started
        self.deadline = deadline  # killed then; once exited, the last wait for its pipes' EOF
        self.out_fd, self.err_fd = out_fd, err_fd
        self.out, self.err = bytearray(), bytearray()
        self.open_fds: set[int] = set()
        self.timed_out = False
        self.status: int | None = None


def main() -> None:
    """Chroot into the stage (argv[1] is its descriptor) and serve requests until stdin ends."""
    stage_fd, workers = int(sys.argv[1]), max(1, int(sys.argv[2]))
    _no_huge_pages()
    devnull = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    os.fchdir(stage_fd)
    os.chroot(".")
    os.close(stage_fd)
    Runner(workers, devnull).serve()
    os._exit(0)  # every reply is written (os.write); the interpreter's teardown only delays


def _no_huge_pages() -> None:
    """Transparent huge pages off for this process and so its probes (prctl(2)
    PR_SET_THP_DISABLE, inherited across fork and exec). A probe runs a few instructions; a
    QEMU that madvises huge pages for its code buffer spends more zeroing 2 MB than running
    it: about 0.5 of 4.4 ms of CPU per probe, measured on this project's bench host."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)


class Runner:
    """The request loop: at most `workers` probes at once, the rest queued in order."""

    def __init__(self, workers: int, devnull: int) -> None:
        self.workers = workers
        self.devnull = devnull
        self.sel = selectors.DefaultSelector()
        self.queue: deque[tuple[str, float, str]] = deque()
        self.jobs: dict[int, _Job] = {}  # pid -> job
        self.by_fd: dict[int, _Job] = {}
        self.inbox = b""
        self.open = True
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self.wake = wake_r
        self.sel.register(wake_r, selectors.EVENT_READ, "wake")
        self.sel.register(0, selectors.EVENT_READ, "in")

    def serve(self) -> None:
        while self.open or self.jobs:
            while self.queue and len(self.jobs) < self.workers:
                self._spawn(*self.queue.popleft())
            for key, _ in self.sel.select(self._wait_s()):
                if key.data == "in":
                    self._read_requests()
                elif key.data == "wake":
                    while True:
                        try:
                            if not os.read(self.wake, 512):
                                break
                        except BlockingIOError:
                            break
                else:
                    self._read_output(key.fd)
            self._expire()
            self._reap()
        # stdin ended: nothing is waiting for what is left
        for ident, _timeout, _name in self.queue:
            self._reply(ident, -1, False, 0, 0, b"", b"the probe runner was stopped")

    def _wait_s(self) -> float | None:
        if not self.jobs:
            return None
        return max(0.0, min(j.deadline for j in self.jobs.values()) - time.monotonic())

    def _read_requests(self) -> None:
        chunk = os.read(0, 65536)
        if not chunk:  # the daemon is gone or done: stop everything
            self.open = False
            self.sel.unregister(0)
            for job in self.jobs.values():
                _kill(job.pid)
            return
        self.inbox += chunk
        *lines, self.inbox = self.inbox.split(b"\n")
        for line in lines:
            ident, timeout_ms, name = line.decode("ascii").split(" ", 2)
            self.queue.append((ident, int(timeout_ms) / 1000, name))

    def _spawn(self, ident: str, timeout_s: float, name: str) -> None:
        path = "/" + name
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        started = time.monotonic()
        try:
            pid = os.posix_spawn(
                path,
                [path],
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, self.devnull, 0),
                    (os.POSIX_SPAWN_DUP2, out_w, 1),
                    (os.POSIX_SPAWN_DUP2, err_w, 2),
                ],
                setpgroup=0,  # its own group: a timeout kills whatever it started too
                setsigdef=(signal.SIGCHLD, signal.SIGPIPE),
            )
        except OSError as exc:
            for fd in (out_r, err_r):
                os.close(fd)
            why = (exc.strerror or str(exc)).encode()
            self._reply(ident, -1, False, 0, exc.errno or 0, b"", why)
            return
        finally:
            os.close(out_w)
            os.close(err_w)
        job = _Job(ident, pid, started + timeout_s, started, out_r, err_r)
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
            job.open_fds.add(fd)
            self.by_fd[fd] = job
            self.sel.register(fd, selectors.EVENT_READ, "out")
        self.jobs[pid] = job

    def _read_output(self, fd: int) -> None:
        job = self.by_fd[fd]
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if chunk:
            buf = job.out if fd == job.out_fd else job.err
            buf += chunk[: max(0, OUTPUT_CAP - len(buf))]
            return
        self._close(job, fd)
        self._finish(job)

    def _close(self, job: _Job, fd: int) -> None:
        self.sel.unregister(fd)
        os.close(fd)
        del self.by_fd[fd]
        job.open_fds.discard(fd)

    def _expire(self) -> None:
        now = time.monotonic()
        for job in list(self.jobs.values()):
            if now < job.deadline:
                continue
            if job.status is None and not job.timed_out:
                job.timed_out = True
                _kill(job.pid)
            elif job.status is not None:
                self._finish(job)  # exited, but something it started holds its pipes

    def _reap(self) -> None:
        for pid, job in list(self.jobs.items()):
            if job.status is not None:
                continue
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                job.status = status
                job.deadline = time.monotonic() + 1.0
                self._finish(job)

    def _finish(self, job: _Job) -> None:
        """Reply once the probe exited and both its pipes reached EOF (or a second passed)."""
        if job.status is None or job.pid not in self.jobs:
            return
        if job.open_fds and time.monotonic() < job.deadline:
            return
        for fd in list(job.open_fds):
            self._close(job, fd)
        del self.jobs[job.pid]
        rc = os.waitstatus_to_exitcode(job.status)
        micros = int((time.monotonic() - job.started) * 1e6)
        self._reply(job.ident, rc, job.timed_out, micros, 0, bytes(job.out), bytes(job.err))

    def _reply(
        self, ident: str, rc: int, timed_out: bool, micros: int, errno: int, out: bytes, err: bytes
    ) -> None:
        head = f"{ident} {rc} {int(timed_out)} {micros} {errno} {len(out)} {len(err)}\n"
        data = memoryview(head.encode() + out + err)
        while data:
            data = data[os.write(1, data) :]


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
