"""The one funnel for subprocesses: minimal environment, stdin from /dev/null, readable errors."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; cpu_count() where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except OSError:
        return os.cpu_count() or 1


def minimal_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment that carries nothing from the caller but PATH, a C locale and `extra`."""
    env = {"PATH": SAFE_PATH, "LC_ALL": "C.UTF-8", "HOME": "/"}
    if extra:
        env.update(extra)
    return env


class CommandError(RuntimeError):
    """A command that failed, with what it printed."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-1:] or ["(no output)"]
        super().__init__(f"{argv[0]} exited with {returncode}: {tail[0]}")


@dataclass(frozen=True)
class Completed:
    """What a finished command returned."""

    returncode: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


class ForkGate:
    """Starting a process and holding a to-be-executed file open for writing, never at once.

    A child holds a copy of every descriptor of its parent from fork until exec (close-on-exec
    closes them then). While a child holds a write descriptor of an emulator being installed,
    the kernel refuses to register that emulator with F, or to exec it (ETXTBSY), however the
    parent closed its own copy. So installs hold `writing()` while such a descriptor is open
    and `run` holds `spawning()` until its child has exec'd (Popen returns then). Many of one
    side may be inside at once; a side waits while the other is inside, and once one side
    waits, the other lets it go next (neither starves). Process-wide, as descriptors are.
    """

    _SPAWN, _WRITE = 0, 1

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._inside = [0, 0]
        self._waiting = [0, 0]
        self._turn = self._SPAWN

    def spawning(self) -> contextlib.AbstractContextManager[None]:
        """Held from fork to exec of a child."""
        return self._side(self._SPAWN)

    def writing(self) -> contextlib.AbstractContextManager[None]:
        """Held while a file that will be executed or registered is open for writing."""
        return self._side(self._WRITE)

    @contextlib.contextmanager
    def _side(self, side: int) -> Iterator[None]:
        other = 1 - side
        with self._cond:
            self._waiting[side] += 1
            try:
                self._cond.wait_for(
                    lambda: (
                        not self._inside[other] and (not self._waiting[other] or self._turn == side)
                    )
                )
            finally:
                self._waiting[side] -= 1
            self._inside[side] += 1
        try:
            yield
        finally:
            with self._cond:
                self._inside[side] -= 1
                if not self._inside[side]:
                    self._turn = other
                self._cond.notify_all()


FORKS = ForkGate()


def run(
    argv: Sequence[str],
    *,
    timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    cwd: str | None = None,
) -> Completed:
    """Run `argv` with a minimal environment; a timeout is a result, not an exception.
    The child is started under `FORKS.spawning()`."""
    with FORKS.spawning():
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=minimal_env(env),
            cwd=cwd,
            close_fds=True,
        )
    result = _finish(proc, timeout)
    if check and not result.timed_out and result.returncode != 0:
        raise CommandError(argv, result.returncode, result.stderr.decode(errors="replace"))
    return result


def _finish(proc: subprocess.Popen[bytes], timeout: float) -> Completed:
    """Wait for `proc` (as subprocess.run does: killed at the timeout or on any exception)."""
    with proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            proc.wait()
            return Completed(-9, exc.stdout or b"", exc.stderr or b"", timed_out=True)
        except BaseException:
            proc.kill()
            raise
    return Completed(proc.returncode, out, err)
