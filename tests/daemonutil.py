"""A real binfmtd daemon for the tests: start it, wait until it serves, talk to it, stop it.

Two ways to run it, neither ever touching the host's binfmt_misc:
- `sandbox`: `binfmtd --sandbox` (its own user + mount namespace and binfmt_misc instance),
  itself started inside an outer `unshare --user --map-root-user --mount` for belt and braces.
- `compose`: `binfmtd` without --sandbox inside a user + mount namespace the test made, with a
  private instance already mounted and uids/gids 0-65535 mapped to themselves, so a `before`
  script can prepare the instance, the daemon's socket group and SO_PEERCRED are the real ones,
  and an `after` script sees the instance once the daemon has exited.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BINFMTD = str(REPO / ".venv" / "bin" / "binfmtd")
BINFMTCTL = str(REPO / ".venv" / "bin" / "binfmtctl")
SYSTEM_PYTHON = "/usr/bin/python3"  # binfmtctl is stdlib-only; the venv is unreadable to others
ENTRIES = "/proc/sys/fs/binfmt_misc"
ID_MAP = "0 0 65536\n"
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}


# --- HTTP over the Unix socket ----------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    """One HTTP answer."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body, decoded."""
        return json.loads(self.body)


def parse_response(raw: bytes) -> Response:
    """Split a complete HTTP/1.1 answer (one, with Content-Length) into its parts."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {raw[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
    length = int(headers.get("content-length", len(body)))
    assert len(body) >= length, f"short body: {len(body)} < {length}"
    return Response(int(lines[0].split(" ")[1]), headers, body[:length])


def exchange(path: str, raw: bytes, timeout: float = 5.0) -> bytes:
    """Send `raw` on a fresh connection and read until the daemon closes it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(raw)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def http(path: str, method: str, target: str, body: bytes = b"", timeout: float = 5.0) -> Response:
    """One request with Connection: close."""
    head = f"{method} {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
    if method == "POST":
        head += f"Content-Length: {len(body)}\r\n"
    return parse_response(exchange(path, head.encode() + b"\r\n" + body, timeout))


def get_json(path: str, target: str, timeout: float = 5.0) -> Any:
    """GET `target` and return its JSON; anything but 200 fails the test."""
    answer = http(path, "GET", target, timeout=timeout)
    assert answer.status == 200, answer
    return answer.json()


# --- waiting ------------------------------------------------------------------------------


def wait_until(what: str, check: Callable[[], Any], timeout: float, every: float = 0.02) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, AssertionError, ValueError):
            last = check()
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


# --- the daemon ---------------------------------------------------------------------------


def sock_dir() -> str:
    """A short, traversable (0755) directory for a socket: AF_UNIX paths are at most 107 bytes."""
    path = tempfile.mkdtemp(prefix="bd-", dir="/tmp")
    os.chmod(path, 0o755)
    return path


class DaemonDied(RuntimeError):
    """The daemon exited while the test waited for it."""


@dataclass
class Daemon:
    """One running binfmtd and the files around it."""

    proc: subprocess.Popen[bytes]
    cfg: Path
    sock: str
    log_path: Path
    work: Path
    mode: str
    _pid: int | None = field(default=None)

    @property
    def pid(self) -> int:
        """The daemon's own (python) pid, as its status reports it."""
        if self._pid is None:
            self._pid = int(self.status()["daemon"]["pid"])
        return self._pid

    def status(self) -> dict[str, Any]:
        """GET /v1/status."""
        result: dict[str, Any] = get_json(self.sock, "/v1/status")
        return result

    def arch(self, name: str) -> dict[str, Any]:
        """One arch's row of the status."""
        return next(a for a in self.status()["arches"] if a["arch"] == name)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log events so far (only those called `name`, if given)."""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        found = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        return [e for e in found if name is None or e.get("event") == name]

    def log_text(self) -> str:
        """The whole stderr, for assertion messages."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def ns(self, script: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run `sh -c script` as root inside the daemon's user + mount namespaces."""
        return subprocess.run(
            ["nsenter", "--target", str(self.pid), "--user", "--mount", "--", "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=CLEAN_ENV,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def ns_ok(self, script: str) -> str:
        """`ns`, failing the test when the script fails; its stdout."""
        done = self.ns(script)
        assert done.returncode == 0, f"{script!r} in the daemon's namespace: {done.stderr}"
        return done.stdout

    def ctl(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """`binfmtctl --socket S ARGV...` as root, in a subprocess."""
        return ctl(self.sock, *argv, timeout=timeout)

    def wait_ready(self, timeout: float = 30) -> None:
        """Until the socket answers /v1/health with ready (or the daemon died)."""

        def ready() -> bool:
            code = self.proc.poll()
            if code is not None:
                raise DaemonDied(f"binfmtd exited with {code} before ready:\n{self.log_text()}")
            return bool(get_json(self.sock, "/v1/health", timeout=1.0)["ready"])

        wait_until("the daemon to serve /v1/health", ready, timeout)

    def daemon_pid(self) -> int:
        """The pid to signal: in compose mode the wrapper shell is not the daemon."""
        if self.mode == "compose":
            pidfile = self.work / "daemon.pid"
            return int(wait_until("the daemon's pid file", pidfile.read_text, 10).strip())
        return self.proc.pid

    def signal(self, sig: int) -> None:
        """Send `sig` to the daemon process itself."""
        os.kill(self.daemon_pid(), sig)

    def daemon_exit_code(self) -> int:
        """The daemon's exit code (in compose mode: as the wrapper shell recorded it)."""
        if self.mode == "compose":
            return int((self.work / "daemon.rc").read_text().strip())
        assert self.proc.returncode is not None
        return self.proc.returncode

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait; the daemon's exit code. Kills it if it does not stop in time."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, AssertionError):
                self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"binfmtd did not stop within {timeout:g} s") from None
        return self.daemon_exit_code()

    def kill(self) -> None:
        """SIGKILL the daemon (and the wrapper) and reap them."""
        with contextlib.suppress(ProcessLookupError, AssertionError, ValueError, OSError):
            os.kill(self.daemon_pid(), signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(10)


def ctl(
    sock: str, *argv: str, timeout: float = 30, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`binfmtctl --socket sock ARGV...` (the venv's console script) as root."""
    return subprocess.run(
        [BINFMTCTL, "--socket", sock, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**CLEAN_ENV, **(env or {})},
        stdin=subprocess.DEVNULL,
        check=False,
    )


def sandbox_argv(cfg: Path) -> list[str]:
    """`binfmtd --sandbox --config cfg` inside an outer user + mount namespace."""
    return [
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        BINFMTD,
        "--sandbox",
        "--config",
        str(cfg),
    ]


COMPOSE_SCRIPT = """set -u
read -r _ <&{gate}
exec {gate}<&-
mount --make-rprivate /
mount -t binfmt_misc binfmt_misc {entries}
{before}
"$BINFMTD" --config "$CFG" </dev/null 2>>"$LOG" &
echo $! >"$WORK/daemon.pid.tmp"; mv "$WORK/daemon.pid.tmp" "$WORK/daemon.pid"
rc=0; wait $! || rc=$?
echo $rc >"$WORK/daemon.rc"
{after}
"""


def _start_compose(
    cfg: Path, log_path: Path, work: Path, before: str, after: str, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """bash in a new user + mount namespace whose ids 0-65535 map to themselves."""
    gate_r, gate_w = os.pipe()
    script = COMPOSE_SCRIPT.format(gate=gate_r, entries=ENTRIES, before=before, after=after)
    try:
        proc = subprocess.Popen(
            ["unshare", "--user", "--mount", "--", "bash", "-c", script],
            pass_fds=(gate_r,),
            env={
                **env,
                "BINFMTD": BINFMTD,
                "CFG": str(cfg),
                "LOG": str(log_path),
                "WORK": str(work),
            },
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_path.open("ab"),
        )
    finally:
        os.close(gate_r)
    try:
        own = os.readlink("/proc/self/ns/user")
        wait_until(
            "the new user namespace",
            lambda: os.readlink(f"/proc/{proc.pid}/ns/user") != own,
            10,
            every=0.005,
        )
        for name in ("uid_map", "gid_map"):
            Path(f"/proc/{proc.pid}/{name}").write_text(ID_MAP, encoding="ascii")
        os.write(gate_w, b"go\n")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        os.close(gate_w)
    return proc


def start(
    cfg: Path,
    sock: str,
    *,
    mode: str = "sandbox",
    before: str = "",
    after: str = "",
    env: dict[str, str] | None = None,
    ready: bool = True,
    timeout: float = 30,
) -> Daemon:
    """Start binfmtd with `cfg` (whose api.socket is `sock`); wait until it serves if `ready`."""
    work = Path(tempfile.mkdtemp(prefix="bd-run-", dir="/tmp"))
    log_path = work / "daemon.log"
    log_path.touch()
    full_env = {**CLEAN_ENV, **(env or {})}
    if mode == "compose":
        proc = _start_compose(cfg, log_path, work, before, after, full_env)
    else:
        assert mode == "sandbox" and not before and not after
        proc = subprocess.Popen(
            sandbox_argv(cfg),
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_path.open("ab"),
        )
    daemon = Daemon(proc, cfg, sock, log_path, work, mode)
    if ready:
        try:
            daemon.wait_ready(timeout)
        except BaseException:
            daemon.kill()
            raise
    return daemon


@contextlib.contextmanager
def running(cfg: Path, sock: str, **kwargs: Any) -> Iterator[Daemon]:
    """`start`; afterwards SIGTERM it and require exit 0 (kill it if the test failed)."""
    daemon = start(cfg, sock, **kwargs)
    try:
        yield daemon
        if daemon.proc.poll() is None:
            code = daemon.stop()
            assert code == 0, f"binfmtd exited with {code} on SIGTERM:\n{daemon.log_text()}"
    finally:
        if daemon.proc.poll() is None:
            daemon.kill()
        shutil.rmtree(daemon.work, ignore_errors=True)


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
