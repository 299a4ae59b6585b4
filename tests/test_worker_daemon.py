"""The daemon hosts a BuildKit worker (the gRPC stand-in) advertising exactly the verified set."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import daemonutil as du
import pytest
from conftest import write_config

from binfmtd.buildkit import WorkerUnreachable, list_workers

FAKE = Path(__file__).with_name("fake_buildkitd")
ARCHES = ["aarch64", "s390x", "riscv64"]
NATIVE = ["linux/amd64", "linux/386"]


def _wait(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    """`wait_until`, also while the worker or its status is not there yet."""
    tolerate = (*du.TRANSIENT, WorkerUnreachable, TypeError)
    return du.wait_until(what, check, timeout, every=0.05, tolerate=tolerate)


BUILDKIT_ADDS = {"linux/amd64/v2", "linux/amd64/v3", "linux/amd64/v4"}


def _served(kit_sock: str) -> list[str]:
    """What the worker serves over ListWorkers, less the amd64 variants BuildKit adds itself."""
    records = list_workers(kit_sock, timeout=2.0)
    return sorted(set(records[0].platforms) - BUILDKIT_ADDS) if records else []


@pytest.fixture
def daemon(tmp_path: Path, sock: str, daemons: list[du.Daemon]) -> dict[str, Any]:
    """A --sandbox daemon with the worker enabled, pointed at the stand-in."""
    return _daemon(tmp_path, sock, daemons)


def _daemon(tmp_path: Path, sock: str, daemons: list[du.Daemon], **kit: Any) -> dict[str, Any]:
    short = os.path.dirname(sock)
    wrapper = Path(short) / "buildkitd"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    wrapper.chmod(0o755)
    kit_sock = f"{short}/kit.sock"
    cfg = write_config(
        tmp_path,
        arches=ARCHES,
        reconcile_interval_s=0.2,
        lock_file=f"{short}/lock",
        api={"socket": sock, "group": None},
        log={"format": "json", "level": "info"},
        buildkit={
            "enabled": True,
            "path": str(wrapper),
            "socket": kit_sock,
            "config_path": f"{short}/buildkitd.toml",
            "state_dir": f"{short}/state",
            "run_dir": f"{short}/kit",
            "socket_group": None,
            "debounce_s": 0.2,
            "grace_s": 2.0,
            "health_interval_s": 0.2,
            **kit,
        },
    )
    running = du.run_daemon(daemons, cfg, outer=False, ready=False)
    return {
        "proc": running.proc,
        "api": sock,
        "kit": kit_sock,
        "dir": short,
        "log": running.log_path,
        "toml": f"{short}/buildkitd.toml",
    }


def _events(info: dict[str, Any]) -> list[dict[str, Any]]:
    """The daemon's JSON log events so far."""
    lines = info["log"].read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def _status(sock: str) -> dict[str, Any]:
    result = du.ctl(sock, "status", "--json")
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def test_worker_serves_exactly_the_verified_set_over_grpc(daemon: dict[str, Any]) -> None:
    """The toml's platforms and what ListWorkers serves equal native + verified emulated."""
    want = sorted([*NATIVE, "linux/arm64", "linux/s390x", "linux/riscv64"])
    served = _wait("worker serving", lambda: _served(daemon["kit"]) == want and want)
    assert served == want
    toml = Path(daemon["toml"]).read_text()
    assert "platforms" in toml
    import tomllib

    assert sorted(tomllib.loads(toml)["worker"]["oci"]["platforms"]) == want
    worker = _wait(
        "worker in status",
        lambda: (
            _status(daemon["api"])["worker"]["state"] == "running"
            and _status(daemon["api"])["worker"]
        ),
    )
    assert worker["pid"] > 0
    assert sorted(worker["intended_platforms"]) == want
    named = _wait("differences named", lambda: _status(daemon["api"])["worker"]["differences"])
    assert not named["missing"]
    assert set(named["buildkit_additions"]) == {"linux/amd64/v2", "linux/amd64/v3"}


def test_verified_set_change_restarts_worker_and_new_set_is_served(daemon: dict[str, Any]) -> None:
    """Disabling an arch drops its platform from ListWorkers (restart); enabling re-adds it."""
    _wait("worker serving arm64", lambda: "linux/arm64" in _served(daemon["kit"]))
    first_pid = _status(daemon["api"])["worker"]["pid"]
    assert du.ctl(daemon["api"], "disable", "aarch64").returncode == 0
    # Off the offer as soon as `disable` answers, before the debounced restart.
    assert "linux/arm64" not in _status(daemon["api"])["worker"]["offered_platforms"]
    _wait("arm64 withdrawn", lambda: "linux/arm64" not in _served(daemon["kit"]))
    restarted = _wait(
        "worker restarted",
        lambda: (
            _status(daemon["api"])["worker"]["pid"] not in (None, first_pid)
            and _status(daemon["api"])["worker"]
        ),
    )
    assert restarted["restarts"] >= 1
    assert "linux/arm64" not in du.ctl(daemon["api"], "platforms").stdout
    assert du.ctl(daemon["api"], "enable", "aarch64").returncode == 0
    _wait("arm64 served again", lambda: "linux/arm64" in _served(daemon["kit"]))


def test_worker_command_and_binfmt_shape(daemon: dict[str, Any]) -> None:
    """`binfmtctl worker` shows state and a buildx line; the binfmt JSON shape lists emulators."""
    _wait("worker serving", lambda: _served(daemon["kit"]))
    _wait("worker running", lambda: _status(daemon["api"])["worker"]["state"] == "running")
    shown = du.ctl(daemon["api"], "worker")
    assert shown.returncode == 0, shown.stderr
    assert "running" in shown.stdout.lower()
    assert f"unix://{daemon['kit']}" in shown.stdout
    assert "docker buildx create" in shown.stdout
    doc = json.loads(du.ctl(daemon["api"], "platforms", "--format", "binfmt").stdout)
    assert set(doc) == {"supported", "emulators"}
    assert {"qemu-aarch64", "qemu-s390x", "qemu-riscv64"} <= set(doc["emulators"])


def test_sigterm_stops_the_worker_cleanly(daemon: dict[str, Any]) -> None:
    """SIGTERM to the daemon stops the worker process and removes both sockets."""
    _wait("worker serving", lambda: _served(daemon["kit"]))
    pid = _status(daemon["api"])["worker"]["pid"]
    daemon["proc"].send_signal(signal.SIGTERM)
    assert daemon["proc"].wait(timeout=20) == 0
    assert not Path(daemon["kit"]).exists()
    assert not Path(daemon["api"]).exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    events = [
        json.loads(line) for line in daemon["log"].read_text().splitlines() if line.startswith("{")
    ]
    assert any(e.get("event") == "worker_output" for e in events), "worker output is logged"


def test_crash_loop_backs_off_to_fatal_and_daemon_keeps_serving(
    tmp_path: Path, sock: str, daemons: list[du.Daemon]
) -> None:
    """A worker that always crashes ends FATAL after max_failures; the daemon stays healthy."""
    info = _daemon(
        tmp_path,
        sock,
        daemons,
        extra_args=["--fake-mode=crash"],
        max_failures=3,
        backoff_initial_s=0.1,
        backoff_max_s=0.4,
    )
    worker = _wait(
        "worker fatal",
        lambda: (
            _status(info["api"])["worker"]["state"] == "fatal" and _status(info["api"])["worker"]
        ),
        timeout=30,
    )
    assert worker["failures"] >= 3
    assert worker["last_error"]
    assert info["proc"].poll() is None
    assert du.ctl(info["api"], "check").returncode == 0
    health = json.loads(du.ctl(info["api"], "status", "--json").stdout)
    assert all(a["state"] == "verified" for a in health["arches"])
    log = info["log"].read_text()
    assert log.count('"state": "backoff"') >= 2, "each failure went through BACKOFF"


def test_refused_platform_is_dropped_with_buildkits_error_and_never_loops(
    tmp_path: Path, sock: str, daemons: list[du.Daemon]
) -> None:
    """A platform whose RUN step fails is named with BuildKit's error, served no more, once."""
    info = _daemon(
        tmp_path, sock, daemons, extra_args=["--fake-refuse=linux/s390x"], backoff_initial_s=0.1
    )
    worker = _wait(
        "s390x refused and the worker back without it",
        lambda: (
            (w := _status(info["api"])["worker"])["state"] == "running"
            and "linux/s390x" in w["refused_platforms"]
            and "linux/s390x" not in w["running_platforms"]
            and "linux/arm64" in w["offered_platforms"]
            and w
        ),
        timeout=120,
    )
    assert "exec format error" in worker["refused_platforms"]["linux/s390x"]
    assert "linux/s390x" not in _served(info["kit"])
    restarts = worker["restarts"]
    refusals = [e for e in _events(info) if e.get("event") == "worker_platform_refused"]
    assert [e["platform"] for e in refusals] == ["linux/s390x"], "refused once, never re-tried"
    rows = {r["platform"]: r for r in worker["platforms"]}
    assert rows["linux/s390x"]["proof"] == "refused"
    assert rows["linux/arm64"]["proof"] == "proven"
    # No loop: re-verifying every arch (s390x included) keeps the refusal and the worker.
    for _ in range(2):
        assert du.ctl(info["api"], "verify").returncode == 0
    later = _status(info["api"])["worker"]
    assert (later["restarts"], later["pid"]) == (restarts, worker["pid"])
    assert "linux/s390x" in later["refused_platforms"]
    assert len([e for e in _events(info) if e.get("event") == "worker_platform_refused"]) == 1
    shown = du.ctl(info["api"], "worker")
    assert shown.returncode == 1, shown.stdout
    assert "linux/s390x" in shown.stdout and "exec format error" in shown.stdout
