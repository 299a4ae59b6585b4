"""Issue 13 on a real daemon: platform names, metrics that move with drift, quiet logs on a
recurring failure, curl over the socket, the CLIs' usage rules and closed pipes, exec's cwd.

Every daemon runs in a private binfmt_misc instance (`binfmtd --sandbox`, see daemonutil).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import daemonutil as du
import pytest
from conftest import Cache, daemon_config, write_config
from daemonutil import ENTRIES, Daemon

from binfmtd import wire

SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def scrape(daemon: Daemon) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics over the socket: (name, labels) -> value."""
    answer = du.http(daemon.sock, "GET", "/metrics")
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in answer.body.decode().splitlines():
        match = SAMPLE.match(line)
        if match is None:
            continue
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
        samples[match["name"], labels] = float(match["value"])
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    """One sample's value (0 when absent)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def daemon(tmp_path: Path, sock: str) -> Iterator[Daemon]:
    """A sandbox daemon configured with Docker names: arm64 and linux/s390x."""
    cfg = daemon_config(
        tmp_path, arches=["arm64", "linux/s390x"], api={"socket": sock, "group": None}
    )
    with du.running(cfg, sock) as running:
        running.wait_verified(["aarch64", "s390x"])
        yield running


def test_docker_names_in_the_config_show_qemu_names_and_platforms(daemon: Daemon) -> None:
    """`arches: [arm64, linux/s390x]` provisions aarch64 and s390x; status shows both names."""
    status = wire.StatusRecord.from_json(daemon.status())
    assert [(a.arch, a.platforms) for a in status.arches] == [
        ("aarch64", ("linux/arm64",)),
        ("s390x", ("linux/s390x",)),
    ]
    assert status.wire == wire.WIRE_VERSION


def test_metrics_move_when_drift_is_injected(daemon: Daemon) -> None:
    """A scrape shows per-arch state and request counts; removing an entry moves the state,
    the repairs counter and the probe histogram, and requests are counted by endpoint/code."""
    before = scrape(daemon)
    assert value(before, "binfmtd_arch_state", arch="aarch64", state="verified") == 1
    assert value(before, "binfmtd_arch_state", arch="aarch64", state="missing") == 0
    assert value(before, "binfmtd_arch_working", arch="s390x") == 1
    assert value(before, "binfmtd_ready") == 1
    probes = value(before, "binfmtd_probe_duration_seconds_count", arch="aarch64", result="ok")
    assert probes >= 1
    repairs = value(before, "binfmtd_repairs_total", action="register", reason="entry missing")

    daemon.ns_ok(f"echo -1 > {ENTRIES}/qemu-aarch64")

    def repaired() -> dict[Any, float] | None:
        now = scrape(daemon)
        done = value(now, "binfmtd_repairs_total", action="register", reason="entry missing")
        ok = value(now, "binfmtd_probe_duration_seconds_count", arch="aarch64", result="ok")
        return now if done == repairs + 1 and ok == probes + 1 else None

    after = du.wait_until("the repair to show in /metrics", repaired, 15, every=0.1)
    assert value(after, "binfmtd_arch_state", arch="aarch64", state="verified") == 1
    assert value(after, "binfmtd_conflicts", arch="aarch64") == 0
    assert value(after, "binfmtd_api_requests_total", endpoint="/metrics", code="200") >= 2
    du.http(daemon.sock, "GET", "/nope")
    again = scrape(daemon)
    assert value(again, "binfmtd_api_requests_total", endpoint="other", code="404") == 1


def test_busy_metrics_port_is_a_status_warning(tmp_path: Path, sock: str) -> None:
    """api.metrics_port already taken: the status warns about it (not only the log), and
    /metrics still answers on the API socket."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        api = {"socket": sock, "group": None, "metrics_port": port}
        cfg = daemon_config(tmp_path, arches=["s390x"], api=api)
        with du.running(cfg, sock) as daemon:
            status = du.http(daemon.sock, "GET", "/v1/status").json()
            assert status["warnings"] == [
                f"metrics are not served on 127.0.0.1:{port} (api.metrics_port): "
                "Address already in use; GET /metrics on the API socket still works"
            ]
            assert du.http(daemon.sock, "GET", "/metrics").status == 200


def test_curl_reads_the_index_over_the_socket(daemon: Daemon) -> None:
    """`curl --unix-socket` works against the h11 server; GET / lists every endpoint."""
    done = du.run(["curl", "-sS", "--unix-socket", daemon.sock, "http://binfmtd/"], 10)
    assert done.returncode == 0, done.stderr
    index = wire.IndexRecord.from_json(json.loads(done.stdout))
    assert index.endpoints == wire.ENDPOINTS


def test_switching_the_native_arch_says_it_is_native(daemon: Daemon) -> None:
    """`binfmtctl disable amd64` on an x86_64 host: the kernel runs amd64 natively, so the
    answer says so (409), not "not configured"; an arch left out of `arches` names the key."""
    done = daemon.ctl("disable", "amd64")
    assert done.returncode != 0
    assert "x86_64 is this host's native architecture" in done.stderr, done.stderr
    assert "HTTP 409" in done.stderr
    done = daemon.ctl("enable", "linux/riscv64")
    assert done.returncode != 0
    assert "riscv64 (not in `arches` in " in done.stderr, done.stderr
    done = daemon.ctl("verify", "amd64", "riscv64")
    assert "x86_64 (this host's native architecture), riscv64 (not in `arches`" in done.stderr


BUSYBOX_UNAME = ("busybox/arm64/bin/busybox", "uname", "-m")


def test_exec_runs_relative_commands_from_the_callers_directory(
    daemon: Daemon, cache: Cache
) -> None:
    """`binfmtctl exec -- busybox/arm64/bin/busybox uname -m` from the cache directory works."""
    done = subprocess.run(
        [du.BINFMTCTL, "--socket", daemon.sock, "exec", "--", *BUSYBOX_UNAME],
        cwd=cache.root,
        env=du.CLEAN_ENV,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, "aarch64\n"), done.stderr


def test_recurring_failure_is_logged_when_it_starts_and_ends(
    tmp_path: Path, sock: str, cache: Cache
) -> None:
    """No emulator source: each arch's install failure is logged once, not every tick, and the
    tick summary stays quiet; once the source appears, the end is logged with a count."""
    source = tmp_path / "later"
    cfg = daemon_config(
        tmp_path,
        arches=["s390x", "riscv64"],
        source={"kind": "directory", "path": str(source)},
        api={"socket": sock, "group": None},
    )
    with du.running(cfg, sock) as daemon:
        time.sleep(2.0)  # about ten 0.2 s ticks, each failing the same way
        failed = daemon.events("install_failed")
        assert sorted(e["arch"] for e in failed) == ["riscv64", "s390x"], failed
        assert all(e["repeat"] == "started" and e["count"] == 0 for e in failed)
        assert len(daemon.events("reconcile_finished")) <= 1
        staging = tmp_path / "staging"
        staging.mkdir()
        for arch in ("s390x", "riscv64"):
            name = f"qemu-{arch}-static"
            (staging / name).write_bytes((cache.qemu_dir / name).read_bytes())
            (staging / name).chmod(0o755)
        staging.rename(source)  # the source appears whole
        daemon.wait_verified(["s390x", "riscv64"])
        ended = {e["arch"]: e for e in daemon.events("install_recovered")}
        assert sorted(ended) == ["riscv64", "s390x"]
        assert all(e["count"] >= 5 and e["duration_s"] > 0 for e in ended.values()), ended


def test_json_without_oneshot_is_a_usage_error() -> None:
    """`binfmtd --json`: exit 64 with the usage line, instead of being ignored."""
    done = du.run([du.BINFMTD, "--json"], 30)
    assert done.returncode == 64
    assert done.stderr.startswith("usage: binfmtd ")
    assert "--json needs --oneshot" in done.stderr


def test_oneshot_json_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`binfmtd --oneshot --json | head -c 1`: no BrokenPipeError traceback, exit 141."""
    cfg = write_config(tmp_path, arches=["s390x"], log={"level": "warning", "format": "json"})
    argv = " ".join([*du.sandbox_argv(cfg), "--oneshot", "--json"])
    script = f"set -o pipefail; {argv} 2>{tmp_path}/err | head -c 1 >/dev/null"
    done = du.run(["bash", "-c", script], 120)
    err = (tmp_path / "err").read_text()
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert done.returncode in {0, 141}, (done.returncode, err)


README = Path(__file__).resolve().parent.parent / "README.md"
RECORDS: list[type[wire.Record]] = [
    *(wire.IndexRecord, wire.StatusRecord, wire.DaemonRecord, wire.ArchRecord),
    *(wire.ProbeRecord, wire.PlatformsRecord, wire.BinfmtRecord, wire.HealthRecord),
    *(wire.WorkerRecord, wire.VerifyResult, wire.ReconcileResult, wire.ArchChange),
    *(wire.ReloadResult, wire.OneshotRecord, wire.ErrorRecord, wire.HandlerRecord),
]


def test_readme_documents_every_endpoint_record_and_exit_code() -> None:
    """The README's API reference names every endpoint with its method, access and record,
    every field of every record, and every exit code of both commands."""
    text = README.read_text(encoding="utf-8")
    for endpoint in wire.ENDPOINTS:
        row = f"| {endpoint.method} | `{endpoint.path}"
        access = "socket group" if endpoint.access == wire.MEMBERS else "root"
        assert (
            any(
                line.startswith(row) and access in line and endpoint.returns.split("/")[0] in line
                for line in text.splitlines()
            )
            or endpoint.path == "/v1"
        ), endpoint
    for record in RECORDS:
        section = text[text.index(f"`{record.__name__}`:") :][:700]
        for name in record.__record_fields__:
            assert f"`{name}`" in section or f'"{name}"' in section or name == "wire", (
                record.__name__,
                name,
            )
    for code in (64, 65, 66, 67, 68, 69, 70, 71, 72, 78, 141):
        assert f"{code} " in text.split("### Exit codes")[1].split("`binfmtctl`:")[0], code
    for code in (1, 3, 4, 5, 64, 127, 141):
        assert f"{code} " in text.split("`binfmtctl`: 0 ok")[1][:900], code


def test_index_matches_the_router() -> None:
    """Every endpoint the index lists is routed (not 404), and nothing routed is missing."""
    from binfmtd.protocol import Request
    from binfmtd.routes import Reject, route

    for endpoint in wire.ENDPOINTS:
        path = endpoint.path.replace("{name}", "aarch64").split("?")[0]
        decision = route(Request(endpoint.method, path, {}, {"host": "x"}, b"", True))
        assert not (isinstance(decision, Reject) and decision.status == 404), endpoint
