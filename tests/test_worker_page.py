"""`binfmtctl worker`'s page and exit code, from /v1/worker records (pure, no daemon)."""

from __future__ import annotations

from typing import Any

from binfmtd import render
from binfmtd.wire import WorkerRecord

LOCAL = "docker buildx create --name binfmtd --driver remote unix:///run/binfmtd/buildkitd.sock"


def row(platform: str, proof: str = "proven", source: str = "verified", reason: Any = None) -> Any:
    """One platform row as the daemon publishes it."""
    return {"platform": platform, "source": source, "proof": proof, "reason": reason}


def worker(**fields: Any) -> WorkerRecord:
    """A running worker serving linux/amd64 and linux/arm64, BuildKit adding amd64/v2."""
    doc: dict[str, Any] = {
        "enabled": True,
        "state": "running",
        "pid": 42,
        "binary": "/usr/local/bin/buildkitd",
        "uptime_s": 75.0,
        "restarts": 0,
        "failures": 0,
        "socket": "/run/binfmtd/buildkitd.sock",
        "platforms": [
            row("linux/amd64"),
            row("linux/amd64/v2", source="buildkit"),
            row("linux/arm64"),
        ],
        "offered_platforms": ["linux/amd64", "linux/arm64", "linux/amd64/v2"],
        "refused_platforms": {},
        "output_tail": [],
        "buildx_command": LOCAL,
        "buildx_append_command": None,
    }
    return WorkerRecord.from_json(doc | fields)


def show(record: WorkerRecord) -> str:
    """The human page."""
    return render.worker_page(record)


def code(record: WorkerRecord) -> int:
    """The exit code."""
    return render.worker_exit_code(record)


def test_disabled_worker_hints_how_to_enable_it_and_exits_0() -> None:
    """Off: no Python repr, the config key to set, where buildkitd comes from; exit 0."""
    shown = show(WorkerRecord(enabled=False))
    assert "False" not in shown
    assert "buildkit.enabled: true" in shown
    assert "https://github.com/moby/buildkit/releases" in shown
    assert code(WorkerRecord(enabled=False)) == 0


def test_running_worker_shows_a_table_and_the_one_node_buildx_line() -> None:
    """Proven platforms in a table, BuildKit's additions named, buildx line without --platform."""
    shown = show(worker())
    assert "worker: running (pid 42, up 1m, 0 restarts, 0 failures)" in shown
    assert "linux/amd64/v2  BuildKit (added by itself)  proven" in shown
    assert "added by BuildKit itself: linux/amd64/v2" in shown
    assert LOCAL in shown and "--platform" not in shown
    assert code(worker()) == 0


def test_refused_platform_is_named_with_buildkits_error_and_exits_1() -> None:
    """A refusal shows BuildKit's own error in the table and makes the exit code 1."""
    error = 'process "/probe" did not complete successfully: exit code: 255 (exec format error)'
    doc = worker(
        platforms=[row("linux/amd64"), row("linux/s390x", "refused", reason=error)],
        refused_platforms={"linux/s390x": error},
    )
    shown = show(doc)
    assert f"linux/s390x  binfmtd  refused  {error}" in shown
    assert "refused by the worker: linux/s390x" in shown
    assert code(doc) == 1


def test_failing_worker_shows_buildkitds_last_lines_and_no_buildx_line() -> None:
    """Crash-looping: exit 1, the cause from buildkitd's own output, nothing to paste."""
    tail = ['time="..." level=fatal msg="mkdir /run/buildkit: read-only file system"']
    doc = worker(
        state="backoff",
        pid=None,
        uptime_s=None,
        failures=2,
        next_start_in_s=4.0,
        last_error="buildkitd exited with code 1",
        output_tail=tail,
        buildx_command=None,
    )
    shown = show(doc)
    assert "next start in 4s" in shown
    assert "buildkitd's last lines:\n  " + tail[0] in shown
    assert "docker buildx create" not in shown
    assert code(doc) == 1


def test_remote_line_routes_only_proven_platforms() -> None:
    """With a TCP listener, the --append line for other machines follows the local one."""
    append = "docker buildx create --append --name binfmtd ... tcp://host:1234"
    shown = show(worker(tcp_address="0.0.0.0:1234", buildx_append_command=append))
    assert "tcp: 0.0.0.0:1234 (mutual TLS)" in shown
    assert shown.index(LOCAL) < shown.index(append)
