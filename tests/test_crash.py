"""Crash consistency: binfmtd killed with SIGKILL at random points never leaves a broken state.

The trials run `scripts/crash-trials.py` (the same driver as the long `scripts/crash-trials`
run) with fewer trials and six arches: one `unshare --user --map-root-user --mount` namespace
with a private binfmt_misc (compose mode), so the instance survives every kill.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import Cache, write_config
from daemonutil import REPO, SandboxSh

TRIALS = 40


def test_sigkill_at_random_points_keeps_the_invariants_and_the_restart_converges(
    cache: Cache,
) -> None:
    """40 random SIGKILLs during a provision: 0 invariant violations, every restart converges."""
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "crash-trials.py"),
            *("--trials", str(TRIALS), "--arches", "subset", "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "BINFMTD_CACHE": str(cache.root)},
        check=False,
    )
    assert result.stdout.strip(), result.stderr
    doc = json.loads(result.stdout)
    summary = {k: doc[k] for k in ("seed", "phases", "kills", "converged")}
    assert doc["violations"] == [], summary
    assert doc["convergence_failures"] == [], summary
    assert doc["trials"] == TRIALS
    assert doc["converged"] == TRIALS
    assert doc["temp_after_restart"] == 0
    assert doc["kills"] >= TRIALS
    # The sampling really reached the provision, not only a finished or idle process.
    assert doc["phases"].get("install", 0) + doc["phases"].get("start", 0) > 0, summary
    assert doc["phases"].get("verify", 0) + doc["phases"].get("register", 0) > 0, summary
    assert result.returncode == 0, result.stderr


def test_temp_files_of_a_killed_install_or_state_write_are_gone_after_the_next_start(
    sandbox_sh: SandboxSh, tmp_path: Path
) -> None:
    """Temp files a SIGKILL left in install_dir and in the state dir: removed by the next start."""
    cfg = write_config(tmp_path, arches=["s390x"])
    planted = [tmp_path / "qemu" / ".binfmtd-tmp-killed1", tmp_path / "state" / ".binfmtd-tmp-k2"]
    plant = " && ".join(f"echo partial > {p}" for p in planted)
    # The second start has nothing to install or record: the cleaning must not depend on that.
    run = f'"$BINFMTD" --oneshot --config {cfg}'
    result = sandbox_sh(f"{run} >/dev/null && {plant} && {run}")
    assert result.returncode == 0, result.stderr
    assert [p for p in planted if p.exists()] == []
