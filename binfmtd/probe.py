"""Proving an emulator works: run a tiny probe of that architecture from an empty root.

The probes run from a root holding nothing but probes (the `Stage`, started by the chrooted
`binfmtd.probe_runner`), so only an entry with the F flag (interpreter opened at registration)
can make them run. A platform is verified only when its probe printed its exact message and
exited 0.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from binfmtd import trust
from binfmtd.run import FORKS, minimal_env, run, usable_cpus
from binfmtd.truth import ProbeResult

PROBE_DIR = Path(__file__).parent / "probes"
IDLE_EVERY_S = 0.01  # how often `Prober.results` calls its idle hook while no result comes
# A runner that answers nothing for `timeout_s` + this while probes wait is stopped or hung
# (each probe it runs ends by `timeout_s`, killed if need be): it is killed, its probes fail.
RUNNER_GRACE_S = 5.0
T = TypeVar("T")


def probe_path(arch: str) -> Path | None:
    """The committed probe binary for `arch`, if the project has one."""
    path = PROBE_DIR / arch
    return path if path.is_file() else None


def expected_output(arch: str) -> bytes:
    """What a probe for `arch` prints when it really ran."""
    return f"binfmtd-probe {arch}\n".encode()


def _write_new(path: str, body: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o700)
    try:
        os.fchmod(fd, mode)
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=64)
def _probe_bytes(source: Path) -> bytes:
    """A probe binary's bytes, read once per process (each root gets a copy written from them)."""
    return source.read_bytes()


def spawn_error(exc: OSError) -> str:
    """Why a probe could not be started (exec failed), and the usual cause."""
    if exc.errno == errno.ENOEXEC:
        return "exec format error: no working binfmt_misc entry with F for this architecture"
    why = f"cannot start the probe: {exc.strerror or exc} (errno {exc.errno}); "
    if exc.errno == errno.ENOENT:
        return why + (
            "the entry's interpreter cannot be found from an empty root (no F flag?), or an "
            "entry that catches this host's own programs is in the way"
        )
    return why + "an entry that catches this host's own programs may be in the way"


class Native(StrEnum):
    """What running a probe directly (no chroot, no emulator asked for) showed."""

    YES = "yes"
    SECCOMP = "seccomp-killed"
    NO = "no"


def run_probe_direct(arch: str, timeout_s: float) -> tuple[Native, str]:
    """Whether the kernel runs the probe for `arch` by itself, and what happened.

    SIGSYS means the kernel loaded and started it, and a seccomp filter on this process
    (systemd's SystemCallArchitectures=native) killed it: the host runs `arch` natively.
    """
    source = probe_path(arch)
    if source is None:
        return Native.NO, "no probe binary"
    try:
        root = tempfile.mkdtemp(prefix="binfmtd-native-")
    except OSError as exc:
        return Native.NO, f"cannot prepare the probe: {exc}"
    try:
        target = os.path.join(root, "probe")
        shutil.copyfile(source, target)
        os.chmod(target, 0o755)
        result = run([target], timeout=timeout_s, check=False)
    except OSError as exc:
        return Native.NO, f"{exc.strerror or exc} (errno {exc.errno})"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if result.returncode == -signal.SIGSYS:
        return Native.SECCOMP, "the probe was killed by seccomp (SIGSYS)"
    why = verdict(arch, result.returncode, result.stdout, result.stderr, False, timeout_s)
    return (Native.YES, "the probe ran natively") if why is None else (Native.NO, why)


def header(arch: str) -> bytes:
    """The first bytes of the probe for `arch` (what binfmt_misc matches); b"" without one."""
    path = probe_path(arch)
    if path is None:
        return b""
    try:
        with open(path, "rb") as handle:
            return handle.read(256)
    except OSError:
        return b""


def verdict(
    arch: str, code: int, out: bytes, err: bytes, timed_out: bool, timeout_s: float
) -> str | None:
    """None when the probe proved the emulator; otherwise why not."""
    if timed_out:
        return f"probe did not finish within {timeout_s:g} s"
    if code == 0 and out == expected_output(arch):
        return None
    text = err.decode(errors="replace").strip().splitlines()
    detail = text[-1] if text else out[:60].decode(errors="replace").strip()
    if code == -signal.SIGSYS:
        return "probe killed by seccomp (SIGSYS): a seccomp filter forbids its system calls"
    if "Exec format error" in detail:
        return "exec format error: no working binfmt_misc entry with F for this architecture"
    return f"probe exited {code}: {detail or 'no output'}"


def judge(arch: str, outcome: Outcome, timeout_s: float, at: float) -> ProbeResult:
    """The ProbeResult of what the runner reported; `at` is when it was judged (Unix s)."""
    if outcome.broken is not None:
        error: str | None = f"cannot run the probe: {outcome.broken}"
    elif outcome.spawn_errno:
        error = spawn_error(OSError(outcome.spawn_errno, outcome.stderr.decode(errors="replace")))
    else:
        error = verdict(
            arch,
            outcome.returncode,
            outcome.stdout,
            outcome.stderr,
            outcome.timed_out,
            timeout_s,
        )
    return ProbeResult(arch, error is None, at, outcome.duration_ms, error)


def workers_for(parallelism: int) -> int:
    """How many probes run at once: `parallelism` at most, and no more than the usable CPUs + 1
    (a probe is a QEMU start, CPU-bound: more at once only adds switching; measured with 33
    probes on 2 cores: 76 ms at 2-3, 80 ms at 8)."""
    return max(1, min(parallelism, usable_cpus() + 1))


@dataclass(frozen=True)
class Outcome:
    """What the probe runner reported for one probe (see `binfmtd.probe_runner`)."""

    returncode: int
    stdout: bytes
    stderr: bytes
    timed_out: bool
    duration_ms: float
    spawn_errno: int = 0  # posix_spawn failed (the probe never started): why
    broken: str | None = None  # the runner itself failed: why


class _Runner:
    """One runner process of a stage, and the probes sent to it that have no answer yet."""

    def __init__(self, stage_fd: int, workers: int) -> None:
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        argv = [
            sys.executable,
            "-I",
            "-S",
            "-c",
            _BOOT,
            str(stage_fd),
            str(workers),
            package_parent,
        ]
        with FORKS.spawning():  # it may start while an emulator is being written (run.FORKS)
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(stage_fd,),
                env=minimal_env(),
                close_fds=True,
            )
        self.pending: dict[str, Future[Outcome]] = {}
        self.lock = threading.Lock()
        self.next_id = 0
        self.answered = time.monotonic()  # the last answer, or when work began after none
        self.why: str | None = None  # why binfmtd killed it (`stop`)
        reader = threading.Thread(target=self._read, name="probe-runner", daemon=True)
        reader.start()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def submit(self, name: str, timeout_s: float) -> Future[Outcome]:
        future: Future[Outcome] = Future()
        with self.lock:
            self.next_id += 1
            ident = str(self.next_id)
            if not self.pending:
                self.answered = time.monotonic()
            self.pending[ident] = future
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(
                    f"{ident} {max(1, round(timeout_s * 1000))} {name}\n".encode()
                )
                self.proc.stdin.flush()
            except (OSError, ValueError):  # it died: `_read` answers everything pending
                pass
        return future

    def _read(self) -> None:
        out = self.proc.stdout
        assert out is not None
        while head := out.readline():
            ident, rc, timed_out, micros, errno_, n_out, n_err = head.split()
            body = out.read(int(n_out) + int(n_err))
            with self.lock:
                future = self.pending.pop(ident.decode(), None)
                self.answered = time.monotonic()
            if future is not None:
                future.set_result(
                    Outcome(
                        int(rc),
                        body[: int(n_out)],
                        body[int(n_out) :],
                        timed_out == b"1",
                        int(micros) / 1000,
                        int(errno_),
                    )
                )
        code = self.proc.wait()
        assert self.proc.stderr is not None
        told = self.proc.stderr.read().decode(errors="replace").strip().splitlines()[-1:]
        why = self.why or f"the probe runner exited with {code}" + (f": {told[0]}" if told else "")
        with self.lock:
            left, self.pending = self.pending, {}
        for future in left.values():
            future.set_result(Outcome(-1, b"", b"", False, 0.0, broken=why))

    def stalled(self, limit_s: float) -> bool:
        """Whether probes wait and the runner has answered none for `limit_s` seconds."""
        with self.lock:
            return bool(self.pending) and time.monotonic() - self.answered > limit_s

    def stop(self, why: str) -> None:
        """Kill it (SIGKILL ends a stopped process too); its waiting probes fail with `why`."""
        self.why = why
        with contextlib.suppress(OSError):
            self.proc.kill()

    def close(self) -> None:
        """End of requests: the runner kills what still runs and exits (killed after 2 s)."""
        with self.lock, contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# The runner's command line: only the standard library and binfmtd.probe_runner are imported.
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv.pop()); from binfmtd.probe_runner import main; main()"
)


@dataclass(frozen=True)
class _Made:
    """A file as binfmtd made it: what `Stage` checks before using it again."""

    dev: int
    ino: int
    size: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> _Made:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns)


class Stage:
    """The probe stage a daemon keeps for its lifetime: one root-only directory holding nothing
    but the probes (one file per arch, named after it), and the runner process chrooted into
    it that starts them (`binfmtd.probe_runner`), `workers_for(parallelism)` at once.

    Why: making a root per probe (mkdtemp, write, rmtree), a thread pool per pass and a
    `chroot` process per probe cost more than a third of a flush repair (33 probes, 2 cores).

    A probe file is used again only while it is exactly as made: a regular file of ours, 0755,
    one link, with the (device, inode, size, ctime) recorded when written (any write, chmod,
    rename over or hard link changes one of them); otherwise it is written afresh. The stage
    directory must stay ours, 0700, the same inode, holding only files binfmtd made; otherwise
    it is dropped with its runner and made again. The stage is made in `workdir`, which must be
    root-only (0700) under a trusted parent, checked by `check` (once a pass):
    made so when missing, refused, never adopted, otherwise (a user who made it first, or who
    can rename it, would choose what runs as a probe). `close` stops the runner (its running
    probes are killed) and removes the stage.
    """

    def __init__(
        self,
        parallelism: int,
        workdir: str,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.workdir = workdir
        self.workers = workers_for(parallelism)
        self._warn = warn  # told why a stage changed behind binfmtd's back is made anew
        self._dir: str | None = None
        self._dir_made: _Made | None = None
        self._made: dict[str, _Made] = {}
        self._runner: _Runner | None = None

    def check(self) -> str | None:
        """Before a pass's probes: None when they may run; otherwise why not (trust error)."""
        try:
            trust.private_dir(os.path.dirname(self.workdir), os.path.basename(self.workdir))
        except (trust.TrustError, OSError) as exc:
            self.close()
            return f"probe roots refused: {exc}"
        changed = None if self._dir is None else self._stage_changed()
        if changed is not None:
            if self._warn is not None:
                self._warn(f"probe stage {self._dir} {changed}: made anew")
            self.close()
        return None

    def _stage_changed(self) -> str | None:
        """None while the stage directory is as binfmtd left it; otherwise what changed."""
        assert self._dir is not None
        try:
            st = os.lstat(self._dir)
            names = os.listdir(self._dir)
        except OSError as exc:
            return f"cannot be read ({exc.strerror})"
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            return "was replaced"
        if stat.S_IMODE(st.st_mode) != 0o700:
            return f"has mode {stat.filemode(st.st_mode)}"
        strangers = sorted(set(names) - set(self._made))
        if strangers:
            return f"holds files binfmtd did not make ({', '.join(strangers[:3])})"
        if _Made.of(st) != self._dir_made:
            return "was changed"
        return None

    def file(self, arch: str) -> bool:
        """Make sure `arch`'s probe is in the stage as made; False without a probe binary.
        OSError when it cannot be written (ENOSPC, EROFS...)."""
        source = probe_path(arch)
        if source is None:
            return False
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="stage-", dir=self.workdir)
        path = os.path.join(self._dir, arch)
        made = self._made.get(arch)
        if made is not None and _file_intact(path, made):
            return True
        self._made.pop(arch, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        try:
            with FORKS.writing():  # no child may take its descriptor along (ETXTBSY)
                _write_new(path, _probe_bytes(source), 0o755)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path)  # ENOSPC mid-write: leave nothing behind
            raise
        self._made[arch] = _Made.of(os.lstat(path))
        self._dir_made = _Made.of(os.lstat(self._dir))  # a new name changed its ctime
        return True

    def start_runner(self) -> _Runner:
        """The runner, started now when none is alive (it boots while the caller goes on).
        OSError when it cannot be started."""
        runner = self._runner
        if runner is None or not runner.alive:
            assert self._dir is not None
            fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                runner = self._runner = _Runner(fd, self.workers)
            finally:
                os.close(fd)
        return runner

    def submit(self, arch: str, timeout_s: float) -> Future[Outcome]:
        """Run `arch`'s probe (made by `file`) in the runner, started when none is alive."""
        try:
            runner = self.start_runner()
        except OSError as exc:  # e.g. an entry catching this host's programs is in the way
            why = (exc.strerror or str(exc)).encode()
            return _done(Outcome(-1, b"", why, False, 0.0, spawn_errno=exc.errno or 0))
        return runner.submit(arch, timeout_s)

    def end_stalled(self, limit_s: float) -> None:
        """Kill the runner when it has answered nothing for `limit_s` s while probes wait
        (stopped, or hung): they fail saying so, and the next probe starts a new runner."""
        runner = self._runner
        if runner is not None and runner.stalled(limit_s):
            self._runner = None
            runner.stop(
                f"the probe runner (pid {runner.proc.pid}) answered nothing for {limit_s:g} s "
                "(stopped or hung): killed; the next probe starts a new one"
            )

    def close(self) -> None:
        """Stop the runner and remove the stage (made again when next needed)."""
        if self._runner is not None:
            self._runner.close()
            self._runner = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir, self._dir_made = None, None
        self._made.clear()


def _file_intact(path: str, made: _Made) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_uid == os.geteuid()
        and st.st_nlink == 1
        and stat.S_IMODE(st.st_mode) == 0o755
        and _Made.of(st) == made
    )


class Prober:
    """Probes of one pass, each started as soon as its arch is ready (pipelined with the
    registrations), in the runner of the daemon's long-lived `Stage`.

    `prepare` puts the probe of every arch the pass may probe in the stage before any probe
    runs (a probe file still open for writing while a process forks would make exec fail with
    ETXTBSY; such a failure is retried twice).
    """

    def __init__(
        self, stage: Stage, timeout_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.timeout_s = timeout_s
        self.clock = clock
        self._stage = stage
        self._ready: set[str] = set()
        self._checked = False
        self._refused: str | None = None
        self._futures: dict[str, Future[ProbeResult]] = {}

    def prepare(self, arches: Iterable[str]) -> None:
        """Put the probe of every arch in `arches` in the stage (call before `start`)."""
        names = [a for a in arches if a not in self._ready and a not in self._futures]
        if not names:
            return
        if not self._checked:
            self._checked = True
            self._refused = self._stage.check()
        if self._refused is not None:
            return
        for arch in names:
            try:
                if self._stage.file(arch):
                    self._ready.add(arch)
                else:
                    self._futures[arch] = self._failed(
                        arch, "no probe binary for this architecture"
                    )
            except OSError as exc:  # ENOSPC, EROFS...: this arch's result, not the pass's end
                self._futures[arch] = self._failed(arch, f"cannot prepare the probe root: {exc}")
        if self._ready:
            with contextlib.suppress(OSError):  # told by each probe's result, if it persists
                self._stage.start_runner()  # boots while the pass registers

    def start(self, arch: str) -> None:
        """Start `arch`'s probe now (put in the stage by `prepare`, else here); once a pass."""
        if arch in self._futures:
            return
        if arch not in self._ready:
            self.prepare([arch])
        if self._refused is not None:
            self._futures[arch] = self._failed(arch, self._refused)
            return
        if arch in self._futures:  # its probe could not be put in the stage
            return
        result: Future[ProbeResult] = Future()
        self._futures[arch] = result
        self._attempt(arch, result, 1)

    def _attempt(self, arch: str, result: Future[ProbeResult], attempt: int) -> None:
        def judged(done: Future[Outcome]) -> None:
            outcome = done.result()
            if outcome.spawn_errno == errno.ETXTBSY and attempt < 3:
                self._attempt(arch, result, attempt + 1)
            else:
                result.set_result(judge(arch, outcome, self.timeout_s, self.clock()))

        self._stage.submit(arch, self.timeout_s).add_done_callback(judged)

    def _failed(self, arch: str, error: str) -> Future[ProbeResult]:
        return _done(ProbeResult(arch, False, self.clock(), 0.0, error))

    @property
    def started(self) -> frozenset[str]:
        """The arches whose probe was started (or failed to start) in this pass."""
        return frozenset(self._futures)

    def results(
        self, idle: Callable[[], None] | None = None, every_s: float = IDLE_EVERY_S
    ) -> Iterator[ProbeResult]:
        """Every started probe's result, in the order they finish; `idle` is called every
        `every_s` seconds while none comes (the engine looks for drift meanwhile)."""
        waiting = set(self._futures.values())
        while waiting:
            done, waiting = wait(waiting, timeout=every_s, return_when=FIRST_COMPLETED)
            if not done:
                self._stage.end_stalled(self.timeout_s + RUNNER_GRACE_S)
                if idle is not None:
                    idle()
            for future in done:
                yield future.result()


def _done(result: T) -> Future[T]:
    future: Future[T] = Future()
    future.set_result(result)
    return future
