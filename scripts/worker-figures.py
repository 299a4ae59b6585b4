#!/usr/bin/env python3
"""Figures for the hosted BuildKit worker against a REAL buildkitd, in `binfmtd --sandbox`.

- start -> first proven platform: from `worker_spawned` to the first `worker_platform_proven`
  (and to `worker_proof_finished`, every advertised platform proven), per daemon start;
- verified-set change -> ListWorkers serving the new set: from `binfmtctl disable aarch64` (and
  `enable`) returning until ListWorkers no longer (again) lists linux/arm64, and until the new
  worker has proven it.
Default worker timings (debounce_s 2.0, health_interval_s 5.0) unless --fast. Needs buildkitd on
PATH or BINFMTD_BUILDKITD, runc, the test cache (BINFMTD_CACHE), root. Not part of the tests.
  .venv/bin/python scripts/worker-figures [--starts N] [--changes N] [--fast]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from binfmtd.buildkit import WorkerUnreachable, list_workers  # noqa: E402

VENV = REPO / ".venv" / "bin"
CACHE = Path(os.environ.get("BINFMTD_CACHE", REPO / "cache"))
SEARCH = f"{os.environ.get('PATH', '')}:/usr/local/bin:/usr/bin"


def wait(what: str, check: Callable[[], Any], timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = check()
        except (OSError, WorkerUnreachable, ValueError, KeyError):
            got = None
        if got:
            return got
        time.sleep(0.01)
    raise SystemExit(f"worker-figures: timed out waiting for {what}")


def stamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


class Run:
    def __init__(self, work: Path, buildkitd: str, fast: bool) -> None:
        self.work, self.kit, self.api = work, str(work / "kit.sock"), str(work / "api.sock")
        kit: dict[str, Any] = {
            "enabled": True,
            "path": buildkitd,
            "socket": self.kit,
            "config_path": str(work / "buildkitd.toml"),
            "state_dir": str(work / "state"),
            "run_dir": str(work / "run"),
            "socket_group": None,
        }
        if fast:
            kit |= {"debounce_s": 0.2, "health_interval_s": 0.2}
        config = {
            "arches": ["aarch64", "s390x", "arm", "riscv64", "ppc64le"],
            "install_dir": str(work / "qemu"),
            "state_file": str(work / "state.json"),
            "lock_file": str(work / "lock"),
            "source": {"kind": "directory", "path": str(CACHE / "qemu" / "usr" / "bin")},
            "reconcile_interval_s": 0.2,
            "log": {"level": "info", "format": "json"},
            "api": {"socket": self.api, "group": None},
            "buildkit": kit,
        }
        self.config = work / "binfmtd.yaml"
        self.config.write_text(json.dumps(config), encoding="utf-8")
        self.config.chmod(0o644)
        self.log = work / "daemon.log"
        argv = [str(VENV / "binfmtd"), "--sandbox", "--config", str(self.config)]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=out)

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = self.log.read_text(errors="replace").splitlines()
        found = [json.loads(line) for line in lines if line.startswith("{")]
        return [e for e in found if e.get("event") == name]

    def worker(self) -> dict[str, Any]:
        argv = [str(VENV / "binfmtctl"), "--socket", self.api, "worker", "--json"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        return dict(json.loads(done.stdout))

    def settled(self) -> bool:
        w = self.worker()
        rows = w["platforms"]
        return w["state"] == "running" and bool(rows) and all(r["proof"] == "proven" for r in rows)

    def ctl(self, *argv: str) -> None:
        command = [str(VENV / "binfmtctl"), "--socket", self.api, *argv]
        subprocess.run(command, capture_output=True, timeout=60, check=True)

    def served(self) -> set[str]:
        records = list_workers(self.kit, timeout=2.0)
        return set(records[0].platforms) if records else set()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def one_start(
    buildkitd: str, fast: bool, changes: int
) -> tuple[dict[str, float], list[dict[str, float]]]:
    work = Path(tempfile.mkdtemp(prefix="wf", dir="/tmp"))
    work.chmod(0o755)
    run = Run(work, buildkitd, fast)
    try:
        wait("the worker's first proof", run.settled, 180)
        spawned = stamp(run.events("worker_spawned")[0])
        first = min(stamp(e) for e in run.events("worker_platform_proven"))
        finished = stamp(run.events("worker_proof_finished")[0])
        start = {"first_proven_s": first - spawned, "all_proven_s": finished - spawned}
        moves = []
        for _ in range(changes):
            for action, gone in (("disable", True), ("enable", False)):
                t0 = time.monotonic()
                run.ctl(action, "aarch64")
                wait("ListWorkers", lambda: ("linux/arm64" not in run.served()) is gone)  # noqa: B023
                t1 = time.monotonic()
                wait("proofs", run.settled)
                moves.append(
                    {f"{action}_served_s": t1 - t0, f"{action}_proven_s": time.monotonic() - t0}
                )
        return start, moves
    finally:
        run.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--changes", type=int, default=2)
    parser.add_argument("--fast", action="store_true", help="debounce/health 0.2 s")
    args = parser.parse_args()
    buildkitd = os.environ.get("BINFMTD_BUILDKITD") or shutil.which("buildkitd", path=SEARCH)
    if not buildkitd:
        print("worker-figures: no buildkitd (PATH or BINFMTD_BUILDKITD)", file=sys.stderr)
        return 69
    starts, moves = [], []
    for _ in range(args.starts):
        start, changed = one_start(buildkitd, args.fast, args.changes)
        starts.append(start)
        moves += changed
    figures: dict[str, list[float]] = {}
    for row in (*starts, *moves):
        for key, value in row.items():
            figures.setdefault(key, []).append(value)
    timing = "debounce_s 0.2, health_interval_s 0.2" if args.fast else "default timings"
    print(f"buildkitd: {buildkitd}; {args.starts} starts, {len(moves)} set changes; {timing}")
    for key, values in figures.items():
        print(
            f"{key:20} median {statistics.median(values):6.2f} s   "
            f"min {min(values):6.2f}   max {max(values):6.2f}   (n={len(values)})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
