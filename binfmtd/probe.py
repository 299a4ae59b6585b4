"""Proving an emulator works: run a tiny probe of that architecture from an empty root.

The probe directory holds nothing but the probe, so only an entry with the F flag (interpreter
opened at registration) can make it run. A platform is verified only when the probe printed its
exact message and exited 0.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from binfmtd import trust
from binfmtd.run import run

PROBE_DIR = Path(__file__).parent / "probes"


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of one probe run."""

    arch: str
    ok: bool
    at: float
    duration_ms: float
    error: str | None = None


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
    """Run /probe in `root` (prepared by `prepare_root`) and judge the outcome."""
    if root is None:
        return ProbeResult(arch, False, clock(), 0.0, "no probe binary for this architecture")
    started = time.monotonic()
    for _attempt in range(3):
        result = run(["chroot", root, "/probe"], timeout=timeout_s, check=False)
        if b"Text file busy" not in result.stderr:
            break
    elapsed = (time.monotonic() - started) * 1000
    error = verdict(
        arch, result.returncode, result.stdout, result.stderr, result.timed_out, timeout_s
    )
    return ProbeResult(arch, error is None, clock(), elapsed, error)


def run_probe_direct(arch: str, timeout_s: float) -> bool:
    """Whether the probe runs by itself (no chroot): used to find host-native 32-bit support."""
    source = probe_path(arch)
    if source is None:
        return False
    root = tempfile.mkdtemp(prefix="binfmtd-native-")
    try:
        target = os.path.join(root, "probe")
        shutil.copyfile(source, target)
        os.chmod(target, 0o755)
        result = run([target], timeout=timeout_s, check=False)
    except OSError:
        return False
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return verdict(arch, result.returncode, result.stdout, result.stderr, False, timeout_s) is None


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
    if "Exec format error" in detail:
        return "exec format error: no working binfmt_misc entry with F for this architecture"
    return f"probe exited {code}: {detail or 'no output'}"


def run_probes(
    arches: Iterable[str],
    timeout_s: float,
    parallelism: int,
    clock: Callable[[], float] = time.time,
    workdir: str | None = None,
) -> dict[str, ProbeResult]:
    """Run the probes in parallel; every arch gets a result.

    Each root is made fresh (mkdtemp) and removed afterwards, never reused. With `workdir`, the
    roots go into that directory, which must be root-only (0700) under a trusted parent: it is
    made so when missing and refused, never adopted, otherwise (a user who made it first, or
    who can rename it, would choose what runs as /probe).
    """
    names = list(arches)
    if not names:
        return {}
    if workdir is not None:
        try:
            trust.private_dir(os.path.dirname(workdir), os.path.basename(workdir))
        except (trust.TrustError, OSError) as exc:
            why = f"probe roots refused: {exc}"
            return {a: ProbeResult(a, False, clock(), 0.0, why) for a in names}
    roots = {a: prepare_root(a, workdir) for a in names}
    try:
        with ThreadPoolExecutor(max_workers=min(parallelism, len(names))) as pool:
            results = pool.map(lambda a: run_in_root(a, roots[a], timeout_s, clock), names)
            return {r.arch: r for r in results}
    finally:
        for root in roots.values():
            if root:
                shutil.rmtree(root, ignore_errors=True)
