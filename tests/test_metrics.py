"""The metrics module on its own: exposition from wire records, events counted, TCP listener."""

from __future__ import annotations

import urllib.request

from binfmtd import wire
from binfmtd.metrics import Metrics, reason_label


def arch(name: str, state: str, at: float, **changes: object) -> wire.ArchRecord:
    """An arch record with a probe that ran at `at`."""
    probe = wire.ProbeRecord(state == "verified", at, 12.0)
    base = wire.ArchRecord(name, (), state, True, True, "POF", "/q", probe=probe)
    values = {**base.to_json(), "probe": probe, "working": state == "verified", **changes}
    return wire.ArchRecord(**values)  # type: ignore[arg-type]


def status(*arches: wire.ArchRecord, worker: wire.WorkerRecord | None = None) -> wire.StatusRecord:
    """A ready daemon's status."""
    daemon = wire.DaemonRecord("0.1.0", 1, ready=True, last_reconcile=1000.0)
    return wire.StatusRecord(daemon, arches, (), worker)


def test_state_probes_repairs_and_requests_show_up() -> None:
    """Every family appears with its labels; a probe is counted once per run, not per publish."""
    metrics = Metrics()
    worker = wire.WorkerRecord(state="running", restarts=2)
    metrics.observe_status(status(arch("aarch64", "verified", 1.0), worker=worker))
    metrics.observe_status(status(arch("aarch64", "verified", 1.0), worker=worker))
    metrics.observe_status(
        status(
            arch("aarch64", "failed", 2.0), arch("s390x", "foreign-verified", 2.0, conflict=True)
        )
    )
    metrics.observe_actions([("register", "clobbered by another tool (interpreter /x)")])
    metrics.observe_request("/v1/status", 200)
    text = metrics.render().decode()
    for line in (
        'binfmtd_arch_state{arch="aarch64",state="failed"} 1.0',
        'binfmtd_arch_state{arch="aarch64",state="verified"} 0.0',
        'binfmtd_arch_working{arch="aarch64"} 0.0',
        'binfmtd_conflicts{arch="s390x"} 1.0',
        'binfmtd_probe_duration_seconds_count{arch="aarch64",result="ok"} 1.0',
        'binfmtd_probe_duration_seconds_count{arch="aarch64",result="failed"} 1.0',
        'binfmtd_repairs_total{action="register",reason="clobbered by another tool"} 1.0',
        'binfmtd_api_requests_total{code="200",endpoint="/v1/status"} 1.0',
        "binfmtd_ready 1.0",
        "binfmtd_last_reconcile_timestamp_seconds 1000.0",
    ):
        assert line in text, line
    assert "_created" not in text


def test_worker_metrics_when_enabled() -> None:
    """Worker state (every state as a series) and restarts appear only with a worker."""
    metrics = Metrics()
    metrics.observe_status(status(worker=wire.WorkerRecord(state="backoff", restarts=3)))
    text = metrics.render().decode()
    assert 'binfmtd_worker_state{state="backoff"} 1.0' in text
    assert 'binfmtd_worker_state{state="running"} 0.0' in text
    assert "binfmtd_worker_restarts_total 3.0" in text
    metrics.observe_status(status())
    assert "binfmtd_worker_state" not in metrics.render().decode()


def test_reason_labels_are_bounded() -> None:
    """Details in parentheses or after a colon do not make new label values."""
    assert reason_label("entry differs: flags PF != POF") == "entry differs"
    assert reason_label("clobbered by another tool (interpreter /usr/bin/q)") == (
        "clobbered by another tool"
    )


def test_loopback_tcp_port_serves_the_same_text() -> None:
    """With a metrics port, http://127.0.0.1:PORT/metrics serves the registry; close stops it."""
    metrics = Metrics()
    metrics.observe_status(status(arch("riscv64", "verified", 1.0)))
    metrics.serve_tcp(0)
    try:
        port = metrics.tcp_port
        assert port is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            body = answer.read().decode()
        assert 'binfmtd_arch_working{arch="riscv64"} 1.0' in body
    finally:
        metrics.close()
    assert metrics.tcp_port is None
