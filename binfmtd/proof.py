"""The proof through the worker: each platform's probe run as a RUN step by buildkitd itself.

QEMU running a probe proves the emulator; only a RUN step through the worker proves BuildKit can
build for the platform (runc, seccomp, the emulator seen from the container). BuildKit runs a
binary of any architecture for any platform it is asked for, so only the platform's own probe
proves anything: `probe_arch` picks it from the catalog.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from binfmtd.arch import CATALOG
from binfmtd.buildkit import SolveOutcome, solve_definition
from binfmtd.llb import probe_definition
from binfmtd.probe import expected_output, probe_path
from binfmtd.supervision import ProofResult

PARALLEL = 4
Solver = Callable[[str, bytes, str, float], SolveOutcome]


def probe_arch(platform: str) -> str | None:
    """The catalog target whose probe proves `platform` (variants beyond the catalog's: by arch).

    linux/amd64/v3 (a level BuildKit adds itself) is proven by the x86_64 probe, linux/arm (no
    variant) by the arm one.
    """
    for arch in CATALOG:
        if platform in arch.platforms:
            return arch.name
    os_arch = "/".join(platform.split("/")[:2])
    for arch in CATALOG:
        if any("/".join(p.split("/")[:2]) == os_arch for p in arch.platforms):
            return arch.name
    return None


def prove_platform(
    socket_path: str, platform: str, timeout: float, solve: Solver = solve_definition
) -> ProofResult:
    """Run `platform`'s probe through the worker at `socket_path`; never raises."""
    arch = probe_arch(platform)
    path = probe_path(arch) if arch else None
    if arch is None or path is None:
        return ProofResult(platform, False, "binfmtd has no probe for this platform", False)
    name = f"[binfmtd proof] RUN /probe ({platform})"
    try:
        definition = probe_definition(platform, path.read_bytes(), name)
        outcome = solve(socket_path, definition.data, name, timeout)
    except (OSError, ValueError) as exc:
        return ProofResult(platform, False, f"cannot ask the worker: {exc}", False)
    if not outcome.ok:
        return ProofResult(platform, False, outcome.error, outcome.conclusive)
    want = expected_output(arch).decode().strip()
    if want not in outcome.output and not outcome.output_complete:
        error = "the step ran but its output did not arrive from Control/Status in time"
        return ProofResult(platform, False, error, conclusive=False)
    if want not in outcome.output:
        got = outcome.output.strip()[-200:] or "nothing"
        return ProofResult(platform, False, f"the step ran but printed {got!r}, not {want!r}")
    return ProofResult(platform, True)


def prove_platforms(
    socket_path: str,
    platforms: Sequence[str],
    timeout: float,
    solve: Solver = solve_definition,
    on_result: Callable[[ProofResult], None] | None = None,
) -> tuple[ProofResult, ...]:
    """Prove every platform, `PARALLEL` at a time; one result per platform, in order.

    `on_result` is called with each result as soon as it is known (from a pool thread).
    """
    if not platforms:
        return ()

    def one(platform: str) -> ProofResult:
        result = prove_platform(socket_path, platform, timeout, solve)
        if on_result is not None:
            on_result(result)
        return result

    with ThreadPoolExecutor(max_workers=min(PARALLEL, len(platforms))) as pool:
        return tuple(pool.map(one, platforms))
