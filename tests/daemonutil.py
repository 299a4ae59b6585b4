"""A real binfmtd daemon for the tests: start it, wait until it serves, talk to it, stop it.

Two ways to run it, neither ever touching the host's binfmt_misc:
- `sandbox`: `binfmtd --sandbox` (its own user + mount namespace and binfmt_misc instance),
  itself started inside an outer `unshare --user --map-root-user --mount` for belt and braces
  (`outer=False`: straight from the host's root, so a real group can own the socket).
- `compose`: `binfmtd` without --sandbox inside a user + mount namespace the test made, with a
  private instance already mounted and uids/gids 0-65535 mapped to themselves, so a `before`
  script can prepare the instance, the daemon's socket group and SO_PEERCRED are the real ones,
  and an `after` script sees the instance once the daemon has exited.
`run_oneshot` runs `binfmtd --oneshot` in conftest's `sandbox_sh` instance instead. Fixtures
(`daemons`, `sock`, `sandbox_sh`) and config writers live in conftest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import yaml

REPO = Path(__file__).resolve().parent.parent
BINFMTD = str(REPO / ".venv" / "bin" / "binfmtd")
BINFMTCTL = str(REPO / ".venv" / "bin" / "binfmtctl")
SYSTEM_PYTHON = "/usr/bin/python3"  # binfmtctl is stdlib-only; the venv is unreadable to others
ENTRIES = "/proc/sys/fs/binfmt_misc"
ID_MAP = "0 0 65536\n"
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}
OUTER = ("unshare", "--user", "--map-root-user", "--mount")
TRANSIENT = (OSError, AssertionError, ValueError, KeyError)  # what a poll may see before ready

SandboxSh = Callable[..., "subprocess.CompletedProcess[str]"]


def run(
    argv: list[str], timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The one subprocess funnel of the tests: text, captured, stdin from /dev/null, no check."""
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=CLEAN_ENV if env is None else env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


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


def wait_until(
    what: str,
    check: Callable[[], Any],
    timeout: float,
    every: float = 0.02,
    tolerate: tuple[type[Exception], ...] = TRANSIENT,
) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout` s.

    An exception in `tolerate` counts as "not yet" (and is shown as the last result).
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except tolerate as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


class Poller:
    """Calls `poll` in a thread every `every` s, from entering the `with` block until leaving it."""

    every = 0.01

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def poll(self) -> None:
        """One round (subclasses record what they see)."""
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.every)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


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
    install_dir: str
    log_path: Path
    work: Path
    mode: str

    @property
    def pid(self) -> int:
        """The daemon's own pid (in sandbox mode `unshare` execs it; compose: its pid file)."""
        if self.mode == "compose":
            pidfile = self.work / "daemon.pid"
            return int(wait_until("the daemon's pid file", pidfile.read_text, 10).strip())
        return self.proc.pid

    def get(self, target: str) -> tuple[int, Any]:
        """GET `target`: (status, decoded JSON body or None)."""
        return _code_and_json(http(self.sock, "GET", target, timeout=60))

    def post(self, target: str, body: bytes = b"") -> tuple[int, Any]:
        """POST `target`: (status, decoded JSON body or None)."""
        return _code_and_json(http(self.sock, "POST", target, body, timeout=60))

    def status(self) -> dict[str, Any]:
        """GET /v1/status."""
        result: dict[str, Any] = get_json(self.sock, "/v1/status")
        return result

    def arches(self) -> dict[str, dict[str, Any]]:
        """arch -> its status row."""
        return {row["arch"]: row for row in self.status()["arches"]}

    def arch(self, name: str) -> dict[str, Any]:
        """One arch's row of the status."""
        return self.arches()[name]

    def wait_verified(self, arches: list[str], timeout: float = 30) -> dict[str, Any]:
        """Until every arch in `arches` shows verified; returns the rows."""

        def done() -> dict[str, Any] | None:
            rows = self.arches()
            return rows if all(rows[a]["state"] == "verified" for a in arches) else None

        return dict(wait_until(f"{arches} verified", done, timeout, every=0.05))

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log events so far (only those called `name`, if given)."""
        found = [json.loads(line) for line in self.log_text().splitlines() if line.startswith("{")]
        return [e for e in found if name is None or e.get("event") == name]

    def log_text(self) -> str:
        """The whole stderr, for assertion messages."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def ns(self, script: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run `sh -c script` as root inside the daemon's user + mount namespaces."""
        argv = ["nsenter", "--target", str(self.pid), "--user", "--mount", "--", "sh", "-c", script]
        return run(argv, timeout)

    def ns_ok(self, script: str) -> subprocess.CompletedProcess[str]:
        """`ns`, failing the test when the script fails."""
        done = self.ns(script)
        assert done.returncode == 0, f"{script!r} in the daemon's namespace: {done.stderr}"
        return done

    def ctl(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """`binfmtctl --socket S ARGV...` as root, in a subprocess."""
        return ctl(self.sock, *argv, timeout=timeout)

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the socket answers /v1/health with ready (or the daemon died)."""

        def ready() -> bool:
            code = self.proc.poll()
            if code is not None:
                raise DaemonDied(f"binfmtd exited with {code} before ready:\n{self.log_text()}")
            return bool(get_json(self.sock, "/v1/health", timeout=1.0)["ready"])

        wait_until("the daemon to serve /v1/health", ready, timeout)

    def signal(self, sig: int) -> None:
        """Send `sig` to the daemon process itself."""
        os.kill(self.pid, sig)

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
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        """Teardown: stop it if it still runs (whatever its exit code), remove its files."""
        with contextlib.suppress(AssertionError, OSError, ValueError):
            self.stop()
        shutil.rmtree(self.work, ignore_errors=True)


def _code_and_json(answer: Response) -> tuple[int, Any]:
    return answer.status, answer.json() if answer.body else None


def ctl(
    sock: str, *argv: str, timeout: float = 30, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`binfmtctl --socket sock ARGV...` (the venv's console script) as root."""
    return run([BINFMTCTL, "--socket", sock, *argv], timeout, {**CLEAN_ENV, **(env or {})})


def sandbox_argv(cfg: Path, *, outer: bool = True) -> list[str]:
    """`binfmtd --sandbox --config cfg`, by default inside an outer user + mount namespace.

    Without `outer` it starts straight from the host's root (which can map a real group).
    """
    return [*(OUTER if outer else ()), BINFMTD, "--sandbox", "--config", str(cfg)]


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
    sock: str | None = None,
    *,
    mode: str = "sandbox",
    outer: bool = True,
    before: str = "",
    after: str = "",
    env: dict[str, str] | None = None,
    ready: bool = True,
    timeout: float = 60,
) -> Daemon:
    """Start binfmtd with `cfg` (api.socket: `sock`, or the config's); wait until ready if `ready`.

    `outer` (sandbox mode) wraps `binfmtd --sandbox` in `unshare`; see `sandbox_argv`.
    """
    body = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    work = Path(tempfile.mkdtemp(prefix="bd-run-", dir="/tmp"))
    log_path = work / "daemon.log"
    log_path.touch()
    full_env = {**CLEAN_ENV, **(env or {})}
    if mode == "compose":
        proc = _start_compose(cfg, log_path, work, before, after, full_env)
    else:
        assert mode == "sandbox" and not before and not after
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                sandbox_argv(cfg, outer=outer),
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
    sock = sock or str(body["api"]["socket"])
    daemon = Daemon(proc, cfg, sock, str(body["install_dir"]), log_path, work, mode)
    if ready:
        try:
            daemon.wait_ready(timeout)
        except BaseException:
            daemon.kill()
            raise
    return daemon


def run_daemon(daemons: list[Daemon], cfg: Path, **kwargs: Any) -> Daemon:
    """`start` a daemon for `cfg` and add it to `daemons` (the fixture that stops them)."""
    daemon = start(cfg, **kwargs)
    daemons.append(daemon)
    return daemon


@contextlib.contextmanager
def running(cfg: Path, sock: str | None = None, **kwargs: Any) -> Iterator[Daemon]:
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


def checksum_file(path: str | Path) -> str:
    """The checksum binfmtd records for a file: `blake3:<hex>`."""
    import blake3  # not at the top: this module is also run by a system python3 (stdlib only)

    digest = blake3.blake3()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return f"blake3:{digest.hexdigest()}"


# --- one-shot runs ------------------------------------------------------------------------


def oneshot_script(extra: str = "") -> str:
    """sandbox_sh script: `extra` set-up, then `binfmtd --oneshot --json`, then the evidence."""
    return f"""{extra}
rc=0; "$BINFMTD" --oneshot --json --config "$CFG" >"$OUT/out" 2>"$OUT/err" || rc=$?
echo "$rc" >"$OUT/rc"
grep -H . {ENTRIES}/qemu-* >"$OUT/entries" 2>/dev/null || true
ls -a "$INSTALL" >"$OUT/ls" 2>/dev/null || true
"""


def run_oneshot(sandbox_sh: SandboxSh, tmp: Path, cfg: Path, extra: str = "") -> dict[str, Any]:
    """The outcome of a one-shot run in a private instance: rc, JSON, stderr, entries, files."""
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    env = {"OUT": str(out), "CFG": str(cfg), "INSTALL": str(tmp / "qemu")}
    result = sandbox_sh(oneshot_script(extra), env=env)
    assert result.returncode == 0, result.stderr
    text = (out / "out").read_text()
    return {
        "rc": int((out / "rc").read_text()),
        "doc": json.loads(text) if text.strip() else None,
        "stderr": (out / "err").read_text(),
        "entries": (out / "entries").read_text(),
        "files": (out / "ls").read_text().split(),
    }


def python_json(code: str, *args: str, timeout: float = 60) -> Any:
    """What `code` printed as JSON, run by a fresh interpreter (this one) with `args`; it
    must exit 0 (asserted with its stderr)."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def sandbox_json(sandbox_sh: SandboxSh, code: str, env: dict[str, str]) -> dict[str, Any]:
    """The last stdout line, as JSON, of `code` run by $PYTHON in a private instance (its
    environment plus `env`); it must exit 0."""
    done = sandbox_sh('"$PYTHON" -c "$SCRIPT"', env={**env, "SCRIPT": code})
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result
