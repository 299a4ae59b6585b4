"""WorkerSupervisor driving the stand-in buildkitd as a real child process over real gRPC."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import structlog
from conftest import LocalUser
from structlog.testing import CapturingLogger

from binfmtd import worker
from binfmtd.buildkit import list_workers
from binfmtd.config import BuildkitConfig
from binfmtd.run import SAFE_PATH
from binfmtd.supervision import WorkerState
from binfmtd.worker import (
    WorkerSupervisor,
    buildkitd_argv,
    read_trusted,
    resolve_binary,
    write_atomic,
)

FAKE = Path(__file__).with_name("fake_buildkitd")
A = ("linux/amd64", "linux/arm64")
B = ("linux/amd64", "linux/arm64", "linux/riscv64")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path, as Unix socket paths must stay under ~100 bytes."""
    path = Path(tempfile.mkdtemp(prefix="bkw", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def config(short_dir: Path) -> BuildkitConfig:
    """Fast timings, private paths, and a `buildkitd` that runs the stand-in with our venv."""
    wrapper = short_dir / "buildkitd"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    wrapper.chmod(0o755)
    return BuildkitConfig(
        enabled=True,
        path=str(wrapper),
        socket=str(short_dir / "run" / "bk.sock"),
        state_dir=str(short_dir / "state"),
        config_path=str(short_dir / "run" / "buildkitd.toml"),
        run_dir=str(short_dir / "run" / "kit"),
        socket_group=None,
        grace_s=3.0,
        debounce_s=0.2,
        backoff_initial_s=0.1,
        backoff_max_s=0.4,
        max_failures=3,
        start_timeout_s=15.0,
        health_interval_s=0.2,
    )


class Harness:
    """A supervisor with a capturing logger and a loop that ticks it until a condition holds."""

    def __init__(self, config: BuildkitConfig) -> None:
        self.logged = CapturingLogger()
        self.logger = structlog.wrap_logger(
            self.logged,
            processors=[],
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        )
        self.sup = WorkerSupervisor(config, logger=self.logger)
        self.socket = config.socket

    def run_until(
        self, desired: tuple[str, ...], done: Callable[[], bool], timeout: float = 20.0
    ) -> None:
        """Tick every 50 ms, like the daemon loop, until `done()` or fail at the deadline."""
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out in {self.sup.snapshot()}"
            self.sup.tick(time.monotonic(), desired)
            time.sleep(0.05)

    def in_state(self, state: WorkerState) -> Callable[[], bool]:
        """A condition: the worker is in `state`."""
        return lambda: self.sup.status.state is state

    def events(self, name: str) -> list[dict[str, Any]]:
        """The keys of every logged event called `name`."""
        return [c.kwargs for c in self.logged.calls if c.kwargs.get("event") == name]

    def served(self) -> set[str]:
        """The platforms the worker serves, asked over gRPC."""
        return {p for r in list_workers(self.socket, timeout=10.0) for p in r.platforms}


@pytest.fixture
def harness(config: BuildkitConfig) -> Iterator[Harness]:
    """A harness whose worker is always stopped at the end."""
    h = Harness(config)
    yield h
    h.sup.stop()


def with_args(h: Harness, config: BuildkitConfig, *args: str, **changes: Any) -> Harness:
    """Rebuild the harness's supervisor with extra buildkitd args and other config changes."""
    h.sup = WorkerSupervisor(replace(config, extra_args=args, **changes), logger=h.logger)
    return h


def gone(pid: int) -> bool:
    """Whether no process has this pid any more (zombies count as gone for us, we reap)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# --- pure helpers ------------------------------------------------------------------------------


def test_argv_has_config_addr_group_then_extra_args(config: BuildkitConfig) -> None:
    """buildkitd gets --config, --addr unix://, --group <gid>, and the user's args last."""
    cfg = replace(config, extra_args=("--debug", "--oci-worker-snapshotter=native"))
    assert buildkitd_argv("/usr/bin/buildkitd", cfg, 997) == [
        "/usr/bin/buildkitd",
        "--config",
        cfg.config_path,
        "--addr",
        f"unix://{cfg.socket}",
        "--group",
        "997",
        "--debug",
        "--oci-worker-snapshotter=native",
    ]
    assert "--group" not in buildkitd_argv("/b", cfg, None)


def test_resolve_binary(short_dir: Path) -> None:
    """Bare names are looked up in the safe PATH; paths must be executable files."""
    assert resolve_binary("sh") in ("/usr/bin/sh", "/bin/sh")
    assert resolve_binary("no-such-buildkitd-anywhere") is None
    assert resolve_binary(str(short_dir)) is None
    assert resolve_binary(str(short_dir / "missing")) is None


def test_write_atomic_replaces_without_leftovers(short_dir: Path) -> None:
    """The file holds the new text and no temporary file is left next to it."""
    target = short_dir / "sub" / "f.toml"
    write_atomic(str(target), "a = 1\n")
    write_atomic(str(target), "a = 2\n")
    assert target.read_text() == "a = 2\n"
    assert os.listdir(target.parent) == ["f.toml"]


# --- the worker lifecycle with a real child ----------------------------------------------------


def test_start_runs_and_serves_the_desired_set(harness: Harness, config: BuildkitConfig) -> None:
    """From STOPPED to RUNNING; ListWorkers serves the desired set; the snapshot says so."""
    harness.run_until(A, harness.in_state(WorkerState.RUNNING))
    assert harness.served() == {*A, "linux/amd64/v2", "linux/amd64/v3"}
    written = tomllib.loads(Path(config.config_path).read_text())
    assert written["worker"]["oci"]["platforms"] == list(A)
    assert written["root"] == config.state_dir
    snap = harness.sup.snapshot().to_json()
    json.dumps(snap)
    assert snap["state"] == "running"
    assert snap["intended_platforms"] == list(A)
    assert snap["differences"] == {
        "missing": [],
        "extra": [],
        "buildkit_additions": ["linux/amd64/v2", "linux/amd64/v3"],
    }
    assert snap["buildx_command"].endswith(f"--driver remote unix://{config.socket}")


def test_child_output_is_forwarded_as_events(harness: Harness) -> None:
    """buildkitd's stderr lines arrive as worker_output events tagged with stream and pid."""
    harness.run_until(A, harness.in_state(WorkerState.RUNNING))
    pid = harness.sup.status.pid
    harness.run_until(
        A, lambda: any("running server" in e["line"] for e in harness.events("worker_output"))
    )
    lines = harness.events("worker_output")
    assert {e["stream"] for e in lines} == {"stderr"}
    assert {e["pid"] for e in lines} == {pid}


def test_platform_change_restarts_and_serves_the_new_set(harness: Harness) -> None:
    """A new desired set restarts the worker, and the new set is what gRPC then serves."""
    harness.run_until(A, harness.in_state(WorkerState.RUNNING))
    first_pid = harness.sup.status.pid
    assert first_pid is not None

    def serving_b() -> bool:
        status = harness.sup.status
        return status.state is WorkerState.RUNNING and status.running_platforms == B

    harness.run_until(B, serving_b)
    assert harness.served() >= set(B)
    assert "linux/riscv64" in harness.served()
    status = harness.sup.status
    assert (status.restarts, status.failures) == (1, 0)
    assert status.pid != first_pid
    assert gone(first_pid)


def test_stop_ends_the_process_and_removes_the_socket(harness: Harness) -> None:
    """stop(): SIGTERM, the worker exits, no process and no socket remain, state STOPPED."""
    harness.run_until(A, harness.in_state(WorkerState.RUNNING))
    pid = harness.sup.status.pid
    assert pid is not None
    harness.sup.stop()
    assert gone(pid)
    assert not os.path.exists(harness.socket)
    assert harness.sup.status.state is WorkerState.STOPPED
    assert harness.sup.status.failures == 0
    signals = [e["signal"] for e in harness.events("worker_signalled")]
    assert signals == ["SIGTERM"]


def test_worker_ignoring_sigterm_is_killed_after_grace(
    harness: Harness, config: BuildkitConfig
) -> None:
    """A worker deaf to SIGTERM gets SIGKILL once grace_s has passed, and its socket is removed."""
    with_args(harness, config, "--fake-ignore-sigterm", grace_s=0.5)
    harness.run_until(A, harness.in_state(WorkerState.RUNNING))
    pid = harness.sup.status.pid
    assert pid is not None
    began = time.monotonic()
    harness.sup.stop()
    took = time.monotonic() - began
    assert 0.5 <= took < 5.0
    assert gone(pid)
    assert not os.path.exists(harness.socket)
    assert [e["signal"] for e in harness.events("worker_signalled")] == ["SIGTERM", "SIGKILL"]


def test_crash_loop_backs_off_with_growing_delays_then_fatal(
    harness: Harness, config: BuildkitConfig
) -> None:
    """A worker that always crashes: BACKOFF 0.1 s, 0.2 s, then FATAL; nothing raises."""
    with_args(harness, config, "--fake-mode=crash")
    harness.run_until(A, harness.in_state(WorkerState.FATAL))
    changes = harness.events("worker_state_changed")
    delays = [e["retry_in_s"] for e in changes if e["state"] == "backoff"]
    assert delays == [0.1, 0.2]
    assert [e["state"] for e in changes].count("fatal") == 1
    snap = harness.sup.snapshot().to_json()
    assert (snap["state"], snap["failures"], snap["pid"]) == ("fatal", 3, None)
    assert "exited with code 1" in snap["last_error"]
    harness.sup.tick(time.monotonic() + 100, A)
    assert harness.sup.status.state is WorkerState.FATAL


def test_reset_leaves_fatal(harness: Harness, config: BuildkitConfig) -> None:
    """After FATAL, reset() (config reload) starts a fresh attempt with no failures."""
    with_args(harness, config, "--fake-mode=crash")
    harness.run_until(A, harness.in_state(WorkerState.FATAL))
    harness.sup.reset()
    assert harness.sup.status.failures == 0
    assert harness.sup.status.state in (WorkerState.STARTING, WorkerState.BACKOFF)


def test_worker_that_dies_later_is_restarted(harness: Harness, config: BuildkitConfig) -> None:
    """A running worker that exits goes to BACKOFF and comes back RUNNING."""
    with_args(harness, config, "--fake-mode=exit-after=0.5", max_failures=10)
    harness.run_until(A, harness.in_state(WorkerState.RUNNING))
    harness.run_until(A, harness.in_state(WorkerState.BACKOFF))
    harness.run_until(A, harness.in_state(WorkerState.RUNNING))
    assert harness.sup.status.restarts >= 1
    # What the restarted worker answered (asking again races its next exit, 0.5 s later).
    assert set(harness.sup.status.advertised_platforms) >= set(A)


def test_start_timeout_kills_a_hung_worker(harness: Harness, config: BuildkitConfig) -> None:
    """A worker that never answers is killed after start_timeout_s and counted as a failure."""
    with_args(harness, config, "--fake-mode=hang", start_timeout_s=0.5)
    harness.run_until(A, lambda: harness.sup.status.pid is not None)
    pid = harness.sup.status.pid
    assert pid is not None
    harness.run_until(A, harness.in_state(WorkerState.BACKOFF))
    assert gone(pid)
    assert harness.sup.status.failures == 1
    assert "no healthy ListWorkers answer" in (harness.sup.status.last_error or "")


@pytest.mark.parametrize("path", ["/nonexistent/buildkitd", "no-such-buildkitd-anywhere"])
def test_missing_binary_is_a_clear_fatal_error(
    harness: Harness, config: BuildkitConfig, path: str
) -> None:
    """No buildkitd binary: FATAL at once with an error that names it; the daemon goes on."""
    with_args(harness, config, path=path)
    harness.run_until(A, harness.in_state(WorkerState.FATAL), timeout=5.0)
    error = harness.sup.snapshot().last_error or ""
    assert "buildkitd not found" in error
    assert path in error
    assert "set buildkit.path" in error


def test_base_config_is_merged_into_the_written_toml(
    harness: Harness, config: BuildkitConfig, short_dir: Path
) -> None:
    """The user's buildkitd.toml keys reach the file buildkitd reads, with our platforms."""
    base = short_dir / "base.toml"
    base.write_text('debug = true\n[registry."docker.io"]\nmirrors = ["mirror.gcr.io"]\n')
    with_args(harness, config, base_config=str(base))
    harness.run_until(A, harness.in_state(WorkerState.RUNNING))
    written = tomllib.loads(Path(config.config_path).read_text())
    assert written["registry"]["docker.io"]["mirrors"] == ["mirror.gcr.io"]
    assert written["worker"]["oci"]["platforms"] == list(A)


def test_broken_base_config_is_a_clear_fatal_error(
    harness: Harness, config: BuildkitConfig, short_dir: Path
) -> None:
    """An unparsable base config stops the worker with an error naming the file."""
    base = short_dir / "base.toml"
    base.write_text("this is = = not toml\n")
    with_args(harness, config, base_config=str(base))
    harness.run_until(A, harness.in_state(WorkerState.FATAL), timeout=5.0)
    assert str(base) in (harness.sup.status.last_error or "")


@pytest.mark.parametrize("who", ["file", "directory"])
def test_base_config_a_user_could_change_is_refused(
    harness: Harness, config: BuildkitConfig, short_dir: Path, local_user: LocalUser, who: str
) -> None:
    """A base_config a user owns (or whose directory they own) never reaches root's buildkitd."""
    theirs = short_dir / "theirs"
    theirs.mkdir()
    base = theirs / "base.toml"
    base.write_text('insecure-entitlements = ["security.insecure"]\n[grpc]\nuid = 1000\n')
    owned = base if who == "file" else theirs
    os.chown(owned, local_user.uid, local_user.gid)
    with_args(harness, config, base_config=str(base))
    harness.run_until(A, harness.in_state(WorkerState.FATAL), timeout=5.0)
    error = harness.sup.status.last_error or ""
    assert f"refusing buildkit base_config {base}" in error
    assert f"chown root: {owned} && chmod go-w {owned}" in error
    assert not Path(config.config_path).exists()


def test_read_trusted_for_tls_files(short_dir: Path, local_user: LocalUser) -> None:
    """read_trusted (for the worker's TLS files) reads root's file and refuses a user's."""
    cert = short_dir / "cert.pem"
    cert.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    cert.chmod(0o644)
    assert read_trusted(str(cert), "tls cert") == cert.read_bytes()
    os.chown(cert, local_user.uid, local_user.gid)
    with pytest.raises(ValueError, match=f"refusing buildkit tls cert {cert}"):
        read_trusted(str(cert), "tls cert")


def _tls_files(where: Path) -> dict[str, str]:
    """Placeholder CA, certificate and key (root's, key 0600): only the trust rule reads them."""
    files = {}
    for key, name in (("tls_ca", "ca.pem"), ("tls_cert", "cert.pem"), ("tls_key", "key.pem")):
        path = where / name
        path.write_bytes(b"-----BEGIN PLACEHOLDER-----\n")
        path.chmod(0o600 if key == "tls_key" else 0o644)
        files[key] = str(path)
    return files


def test_tcp_listener_argv_carries_buildkitds_mutual_tls_flags(
    config: BuildkitConfig, short_dir: Path
) -> None:
    """tcp_address adds a tcp:// --addr with --tlscacert/--tlscert/--tlskey."""
    tls = _tls_files(short_dir)
    cfg = replace(
        config,
        tcp_address="127.0.0.1:1234",
        tls_ca=tls["tls_ca"],
        tls_cert=tls["tls_cert"],
        tls_key=tls["tls_key"],
    )
    argv = buildkitd_argv("/usr/bin/buildkitd", cfg, None)
    assert argv[argv.index("tcp://127.0.0.1:1234") - 1] == "--addr"
    assert argv[argv.index("--tlscacert") + 1] == tls["tls_ca"]
    assert argv[argv.index("--tlscert") + 1] == tls["tls_cert"]
    assert argv[argv.index("--tlskey") + 1] == tls["tls_key"]


@pytest.mark.parametrize("fault", ["user-owned cert", "readable key"])
def test_tls_files_failing_the_trust_rule_stop_the_worker(
    harness: Harness, config: BuildkitConfig, short_dir: Path, local_user: LocalUser, fault: str
) -> None:
    """A certificate a user could swap, or a key others can read: FATAL, naming file and fix."""
    tls = _tls_files(short_dir)
    if fault == "user-owned cert":
        os.chown(tls["tls_cert"], local_user.uid, local_user.gid)
        expected = f"refusing buildkit tls_cert {tls['tls_cert']}"
    else:
        os.chmod(tls["tls_key"], 0o644)
        expected = f"chmod 600 {tls['tls_key']}"
    with_args(harness, config, tcp_address="127.0.0.1:1234", **tls)
    harness.run_until(A, harness.in_state(WorkerState.FATAL), timeout=5.0)
    assert expected in (harness.sup.status.last_error or "")


# --- worker identity (issue 11, item 7) ---------------------------------------------------------


@pytest.mark.parametrize("pidfile_format", ["bare pid", "identity of another start"])
def test_reap_orphan_spares_a_client_naming_our_socket(
    config: BuildkitConfig, local_user: LocalUser, pidfile_format: str
) -> None:
    """A user's `buildctl --addr unix://<our socket>` whose pid the pidfile names survives."""
    client = local_user.popen(
        [
            "/usr/bin/python3",
            "-c",
            "import time; time.sleep(120)",
            "--addr",
            f"unix://{config.socket}",
        ]
    )
    try:
        sup = WorkerSupervisor(config)
        os.makedirs(config.state_dir, exist_ok=True)
        record = (
            f"{client.pid}\n"
            if pidfile_format == "bare pid"
            else json.dumps({"pid": client.pid, "start_time": 1.0, "exe": "/usr/bin/buildkitd"})
        )
        Path(sup.pidfile).write_text(record)
        assert sup.reap_orphan() is None
        assert client.poll() is None, "a process that was not our worker got a signal"
        assert not Path(sup.pidfile).exists()
    finally:
        client.kill()
        client.wait()


def test_reap_orphan_stops_our_own_orphan(harness: Harness, config: BuildkitConfig) -> None:
    """The worker a killed daemon left behind (same pid, start time, executable) is reaped."""
    harness.run_until(A, harness.in_state(WorkerState.RUNNING))
    pid = harness.sup.status.pid
    assert pid is not None
    recorded = json.loads(Path(harness.sup.pidfile).read_text())
    assert recorded["pid"] == pid and recorded["exe"] and recorded["start_time"] > 0
    successor = WorkerSupervisor(config)  # the restarted daemon's supervisor
    assert successor.reap_orphan() == pid
    assert gone(pid)


def test_pidfile_is_removed_on_stop(harness: Harness) -> None:
    """After stop no pidfile is left to name a pid that may be reused."""
    harness.run_until(A, harness.in_state(WorkerState.RUNNING))
    assert Path(harness.sup.pidfile).exists()
    harness.sup.stop()
    assert not Path(harness.sup.pidfile).exists()


@pytest.mark.parametrize("lookup", ["path", "name"])
def test_buildkitd_anyone_can_write_is_never_run(
    harness: Harness, config: BuildkitConfig, short_dir: Path, lookup: str
) -> None:
    """A 0777 buildkitd in a non-sticky 0777 directory: FATAL naming the fix, never executed."""
    shared = short_dir / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    marker = short_dir / "ran"
    binary = shared / "buildkitd"
    binary.write_text(f"#!/bin/sh\ntouch {marker}\n")
    binary.chmod(0o777)
    with pytest.MonkeyPatch.context() as patch:
        if lookup == "name":  # found through PATH: the same rule on what the lookup found
            patch.setattr(worker, "SAFE_PATH", str(shared))
        with_args(harness, config, path=str(binary) if lookup == "path" else "buildkitd")
        harness.run_until(A, harness.in_state(WorkerState.FATAL), timeout=5.0)
    error = harness.sup.snapshot().last_error or ""
    assert f"refusing to run buildkitd {binary}" in error
    assert error.count("run `") == 1
    # The first component that fails the rule is named: here the shared directory.
    assert f"chown root: {shared} && chmod go-w {shared}" in error
    assert not marker.exists()


def test_the_checked_runc_is_the_one_buildkitd_runs(
    harness: Harness, config: BuildkitConfig
) -> None:
    """buildkitd's OCI worker gets the absolute path of the runc binfmtd checked."""
    harness.run_until(A, harness.in_state(WorkerState.RUNNING))
    written = tomllib.loads(Path(config.config_path).read_text())
    runc = shutil.which("runc", path=SAFE_PATH)
    assert runc is not None, "scripts/setup installs runc"
    assert written["worker"]["oci"]["binary"] == os.path.realpath(runc)


@pytest.mark.parametrize("named_by", ["base_config", "extra_args"])
def test_an_oci_runtime_anyone_can_write_is_never_run(
    harness: Harness, config: BuildkitConfig, short_dir: Path, named_by: str
) -> None:
    """A world-writable OCI runtime (named by the base config's `[worker.oci] binary` or by
    `--oci-worker-binary`) stops the worker with the fix named; buildkitd is never started."""
    shared = short_dir / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    runtime = shared / "runc"
    runtime.write_text("#!/bin/sh\nexit 0\n")
    runtime.chmod(0o777)
    if named_by == "base_config":
        base = short_dir / "base.toml"
        base.write_text(f'[worker.oci]\nbinary = "{runtime}"\n')
        with_args(harness, config, base_config=str(base))
    else:
        with_args(harness, config, f"--oci-worker-binary={runtime}")
    harness.run_until(A, harness.in_state(WorkerState.FATAL), timeout=5.0)
    error = harness.sup.snapshot().last_error or ""
    assert f"refusing OCI runtime {runtime}" in error
    assert f"chown root: {shared} && chmod go-w {shared}" in error
    assert harness.sup.snapshot().pid is None


def test_a_missing_oci_runtime_names_the_package(harness: Harness, config: BuildkitConfig) -> None:
    """No runc where buildkitd would look: FATAL saying how to get it."""
    with_args(harness, config, "--oci-worker-binary", "no-such-runc-anywhere")
    harness.run_until(A, harness.in_state(WorkerState.FATAL), timeout=5.0)
    error = harness.sup.snapshot().last_error or ""
    assert "OCI runtime 'no-such-runc-anywhere' not found" in error
    assert "apt-get install runc" in error
