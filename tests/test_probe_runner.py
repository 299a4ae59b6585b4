"""The probe stage and its runner (issue 14): probes run from a root holding nothing but probes,
started by one chrooted runner process; its failures are results, never exceptions. The x86_64
probe runs natively here, so no binfmt_misc entry is needed (the foreign ones are covered by
test_truth, test_pipeline and test_faults through the daemon)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import daemonutil as du
from daemonutil import SandboxSh

from binfmtd import probe
from binfmtd.truth import ProbeResult


def _one(prober: probe.Prober, arch: str) -> ProbeResult:
    prober.start(arch)
    (result,) = [r for r in prober.results() if r.arch == arch]
    return result


def test_a_probe_runs_from_a_root_holding_only_probes(tmp_path: Path) -> None:
    stage = probe.Stage(2, str(tmp_path / "roots"))
    try:
        prober = probe.Prober(stage, 5.0)
        prober.prepare(["x86_64", "aarch64"])
        result = _one(prober, "x86_64")
        assert result.ok, result
        runner = stage.start_runner()
        (stage_dir,) = (tmp_path / "roots").iterdir()
        assert sorted(os.listdir(stage_dir)) == ["aarch64", "x86_64"]
        assert os.readlink(f"/proc/{runner.proc.pid}/root") == str(stage_dir)
        assert (stage_dir.stat().st_mode & 0o777, (tmp_path / "roots").stat().st_mode & 0o777) == (
            0o700,
            0o700,
        )
    finally:
        stage.close()
    assert os.listdir(tmp_path / "roots") == []


def test_a_killed_runner_is_a_failed_result_and_the_next_probe_starts_a_new_one(
    tmp_path: Path,
) -> None:
    stage = probe.Stage(2, str(tmp_path / "roots"))
    try:
        prober = probe.Prober(stage, 5.0)
        prober.prepare(["x86_64"])
        first = stage.start_runner()
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
        outcome = first.submit("x86_64", 5.0).result(10)
        assert outcome.broken is not None and "exited with -9" in outcome.broken
        assert "cannot run the probe: the probe runner exited with -9" in (
            probe.judge("x86_64", outcome, 5.0, 0.0).error or ""
        )
        prober = probe.Prober(stage, 5.0)
        again = _one(prober, "x86_64")
        assert again.ok, again
        assert stage.start_runner().proc.pid != first.proc.pid
    finally:
        stage.close()


NO_ENTRY = r"""
import json, os, sys
sys.path.insert(0, os.environ["REPO"])
from binfmtd import probe
stage = probe.Stage(1, os.environ["WORK"])
prober = probe.Prober(stage, 5.0)
prober.start("s390x")
(result,) = prober.results()
stage.close()
print(json.dumps({"ok": result.ok, "error": result.error}))
"""


def test_a_probe_with_no_entry_says_exec_format_error(
    sandbox_sh: SandboxSh, tmp_path: Path
) -> None:
    """In a private instance with no entry, the runner's exec fails: a failed result naming
    the cause (ENOEXEC), not an exception."""
    result = du.sandbox_json(sandbox_sh, NO_ENTRY, {"WORK": str(tmp_path / "roots")})
    assert result == {
        "ok": False,
        "error": "exec format error: no working binfmt_misc entry with F for this architecture",
    }
