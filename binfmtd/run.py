"""The one funnel for subprocesses: minimal environment, stdin from /dev/null, readable errors."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


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


def run(
    argv: Sequence[str],
    *,
    timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    cwd: str | None = None,
) -> Completed:
    """Run `argv` with a minimal environment; a timeout is a result, not an exception."""
    try:
        proc = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=minimal_env(env),
            cwd=cwd,
            check=False,
            close_fds=True,
        )
    except subprocess.TimeoutExpired as exc:
        return Completed(-9, exc.stdout or b"", exc.stderr or b"", timed_out=True)
    result = Completed(proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr.decode(errors="replace"))
    return result


def is_root() -> bool:
    """Whether this process runs with uid 0 (in its own user namespace)."""
    return os.geteuid() == 0
