"""`binfmtctl worker`'s page and exit code, from /v1/worker documents (pure, no daemon)."""

from __future__ import annotations

from typing import Any

from binfmtd import workerview

LOCAL = "docker buildx create --name binfmtd --driver remote unix:///run/binfmtd/buildkitd.sock"


def row(platform: str, proof: str = "proven", source: str = "verified", reason: Any = None) -> Any:
    """One platform row as the daemon publishes it."""
    return {"platform": platform, "source": source, "proof": proof, "reason": reason}


def worker(**fields: Any) -> dict[str, Any]:
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
    return doc | fields


def test_disabled_worker_hints_how_to_enable_it_and_exits_0() -> None:
    """Off: no Python repr, the config key to set, where buildkitd comes from; exit 0."""
    page = workerview.page({"enabled": False})
    assert "False" not in page
    assert "buildkit.enabled: true" in page
    assert "https://github.com/moby/buildkit/releases" in page
    assert workerview.exit_code({"enabled": False}) == 0


def test_running_worker_shows_a_table_and_the_one_node_buildx_line() -> None:
    """Proven platforms in a table, BuildKit's additions named, buildx line without --platform."""
    page = workerview.page(worker())
    assert "worker: running (pid 42, up 75s, 0 restarts, 0 failures)" in page
    assert "linux/amd64/v2  BuildKit (added by itself)  proven" in page
    assert "added by BuildKit itself: linux/amd64/v2" in page
    assert LOCAL in page and "--platform" not in page
    assert workerview.exit_code(worker()) == 0


def test_refused_platform_is_named_with_buildkits_error_and_exits_1() -> None:
    """A refusal shows BuildKit's own error in the table and makes the exit code 1."""
    error = 'process "/probe" did not complete successfully: exit code: 255 (exec format error)'
    doc = worker(
        platforms=[row("linux/amd64"), row("linux/s390x", "refused", reason=error)],
        refused_platforms={"linux/s390x": error},
    )
    page = workerview.page(doc)
    assert f"linux/s390x  binfmtd  refused  {error}" in page
    assert "refused by the worker: linux/s390x" in page
    assert workerview.exit_code(doc) == 1


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
    page = workerview.page(doc)
    assert "next start in 4s" in page
    assert "buildkitd's last lines:\n  " + tail[0] in page
    assert "docker buildx create" not in page
    assert workerview.exit_code(doc) == 1


def test_remote_line_routes_only_proven_platforms() -> None:
    """With a TCP listener, the --append line for other machines follows the local one."""
    append = "docker buildx create --append --name binfmtd ... tcp://host:1234"
    page = workerview.page(worker(tcp_address="0.0.0.0:1234", buildx_append_command=append))
    assert "tcp: 0.0.0.0:1234 (mutual TLS)" in page
    assert page.index(LOCAL) < page.index(append)
