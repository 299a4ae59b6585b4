"""Proving an emulator works: run a tiny probe of that architecture from an empty root.

The probe directory holds nothing but the probe, so only an entry with the F flag (interpreter
opened at registration) can make it run. A platform is verified only when the probe printed its
exact message and exited 0.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from enum import StrEnum
from pathlib import Path

from binfmtd import trust
from binfmtd.run import run
from binfmtd.truth import ProbeResult

PROBE_DIR = Path(__file__).parent / "probes"


def probe_path(arch: str) -> Path | None:
    """The committed probe binary for `arch`, if the project has one."""
    path = PROBE_DIR / arch
    return path if path.is_file() else None


def expected_output(arch: str) -> bytes:
    """What a probe for `arch` prints when it really ran."""
    return f"binfmtd-probe {arch}\n".encode()


def prepare_root(arch: str, workdir: str | None = None) -> str | None:
    """An empty temp directory holding only /probe (0755); None without a probe binary.

    Roots are prepared before any probe runs: a file still open for writing while another
    thread forks would make exec fail with ETXTBSY.
    """
    source = probe_path(arch)
    if source is None:
        return None
    root = tempfile.mkdtemp(prefix="binfmtd-probe-", dir=workdir)
    target = os.path.join(root, "probe")
    shutil.copyfile(source, target)
    os.chmod(target, 0o755)
    return root


def run_probe(arch: str, timeout_s: float, clock: Callable[[], float] = time.time) -> ProbeResult:
    """Run the probe for `arch` chrooted into an empty directory."""
    root = prepare_root(arch)
    try:
        return run_in_root(arch, root, timeout_s, clock)
    finally:
        if root:
            shutil.rmtree(root, ignore_errors=True)


def run_in_root(
    arch: str, root: str | None, timeout_s: float, clock: Callable[[], float] = time.time
) -> ProbeResult:
    """Run /probe in `root` (prepared by `prepare_root`) and judge the outcome.

    A probe that cannot even start (chroot itself fails to exec, for instance when an entry
    catches the host's own programs and its interpreter is gone) is a failed result, not an
    exception.
    """
    if root is None:
        return ProbeResult(arch, False, clock(), 0.0, "no probe binary for this architecture")
    started = time.monotonic()
    try:
        for _attempt in range(3):
            result = run(["chroot", root, "/probe"], timeout=timeout_s, check=False)
            if b"Text file busy" not in result.stderr:
                break
    except OSError as exc:
        elapsed = (time.monotonic() - started) * 1000
        return ProbeResult(arch, False, clock(), elapsed, spawn_error(exc))
    elapsed = (time.monotonic() - started) * 1000
    error = verdict(
        arch, result.returncode, result.stdout, result.stderr, result.timed_out, timeout_s
    )
    return ProbeResult(arch, error is None, clock(), elapsed, error)


def spawn_error(exc: OSError) -> str:
    """Why a probe could not be started, and the usual cause."""
    return (
        f"cannot start the probe: {exc.strerror or exc} (errno {exc.errno}); an entry that "
        "catches this host's own programs may be in the way"
    )


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


def workers_for(parallelism: int) -> int:
    """How many probes run at once: `parallelism` at most, and no more than the usable CPUs + 1
    (a probe is a QEMU start, CPU-bound: more at once only adds switching; measured with 33
    probes on 2 cores: 76 ms at 2-3, 80 ms at 8)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except OSError:
        cpus = os.cpu_count() or 1
    return max(1, min(parallelism, cpus + 1))


class Prober:
    """Probes of one pass, each started as soon as its arch is ready (pipelined with the
    registrations), on a pool of `workers_for(parallelism)` threads. Use as a context manager:
    the roots are removed on exit.

    `prepare` makes the roots of every arch the pass may probe, before any probe runs (a root's
    file still open for writing while another thread forks would make exec fail with ETXTBSY).
    Each root is made fresh (mkdtemp) and removed afterwards, never reused. With `workdir`, the
    roots go into that directory, which must be root-only (0700) under a trusted parent: it is
    made so when missing and refused, never adopted, otherwise (a user who made it first, or
    who can rename it, would choose what runs as /probe).
    """

    def __init__(
        self,
        timeout_s: float,
        parallelism: int,
        clock: Callable[[], float] = time.time,
        workdir: str | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.clock = clock
        self.workdir = workdir
        self._workers = workers_for(parallelism)
        self._pool: ThreadPoolExecutor | None = None
        self._roots: dict[str, str | None] = {}
        self._refused: str | None = None
        self._futures: dict[str, Future[ProbeResult]] = {}

    def __enter__(self) -> Prober:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for root in self._roots.values():
            if root:
                shutil.rmtree(root, ignore_errors=True)
        self._roots.clear()

    def prepare(self, arches: Iterable[str]) -> None:
        """Make the root of every arch in `arches` that has none yet (call before `start`)."""
        names = [a for a in arches if a not in self._roots and a not in self._futures]
        if not names or self._refused is not None:
            return
        if self.workdir is not None and not self._roots:
            try:
                trust.private_dir(os.path.dirname(self.workdir), os.path.basename(self.workdir))
            except (trust.TrustError, OSError) as exc:
                self._refused = f"probe roots refused: {exc}"
                return
        for arch in names:
            try:
                self._roots[arch] = prepare_root(arch, self.workdir)
            except OSError as exc:  # ENOSPC, EROFS...: this arch's result, not the pass's end
                self._futures[arch] = _done(
                    ProbeResult(
                        arch, False, self.clock(), 0.0, f"cannot prepare the probe root: {exc}"
                    )
                )

    def start(self, arch: str) -> None:
        """Start `arch`'s probe now (its root made by `prepare`, else made here); once a pass."""
        if arch in self._futures:
            return
        if arch not in self._roots:
            self.prepare([arch])
        if self._refused is not None:
            self._futures[arch] = _done(ProbeResult(arch, False, self.clock(), 0.0, self._refused))
            return
        if arch in self._futures:  # its root could not be made
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="probe")
        self._futures[arch] = self._pool.submit(self._run, arch)

    def _run(self, arch: str) -> ProbeResult:
        """One probe on a pool thread; its root is removed right after, while others run."""
        root = self._roots[arch]
        try:
            return run_in_root(arch, root, self.timeout_s, self.clock)
        finally:
            if root:
                shutil.rmtree(root, ignore_errors=True)
            self._roots.pop(arch, None)

    @property
    def started(self) -> frozenset[str]:
        """The arches whose probe was started (or failed to start) in this pass."""
        return frozenset(self._futures)

    def results(self) -> Iterator[ProbeResult]:
        """Every started probe's result, in the order they finish."""
        waiting = {f: a for a, f in self._futures.items()}
        for future in as_completed(waiting):
            yield future.result()


def _done(result: ProbeResult) -> Future[ProbeResult]:
    future: Future[ProbeResult] = Future()
    future.set_result(result)
    return future


def run_probes(
    arches: Iterable[str],
    timeout_s: float,
    parallelism: int,
    clock: Callable[[], float] = time.time,
    workdir: str | None = None,
) -> dict[str, ProbeResult]:
    """Run the probes in parallel; every arch gets a result (see `Prober` for the roots)."""
    names = list(arches)
    with Prober(timeout_s, parallelism, clock, workdir) as prober:
        prober.prepare(names)
        for arch in names:
            prober.start(arch)
        found = {r.arch: r for r in prober.results()}
    return {a: found[a] for a in names}
