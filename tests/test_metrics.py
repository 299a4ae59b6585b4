"""The metrics module on its own: exposition from wire records, events counted, TCP listener."""

from __future__ import annotations

import urllib.request

import daemonutil as du
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    enable_created_metrics,
    generate_latest,
)

from binfmtd import wire
from binfmtd.metrics import PROBE_BUCKETS, Metrics, reason_label


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


SCRAPE_LOADS = """
import json, sys
import binfmtd.service
from binfmtd import wire
from binfmtd.metrics import Metrics
probe = wire.ProbeRecord(True, 1.0, 12.0)
row = wire.ArchRecord("aarch64", (), "verified", True, True, "POF", "/q", probe=probe)
metrics = Metrics()
metrics.observe_status(wire.StatusRecord(wire.DaemonRecord("0.1.0", 1, ready=True), (row,)))
metrics.observe_actions([("register", "missing")])
metrics.observe_request("/v1/status", 200)
before = "prometheus_client" in sys.modules
text = metrics.render().decode()
print(json.dumps({"before": before, "after": "prometheus_client" in sys.modules, "text": text}))
"""


def test_prometheus_client_is_imported_by_the_first_scrape_only() -> None:
    """Events are counted without prometheus_client (its import costs ~12 MB of RSS); the
    first scrape imports it and shows every event counted before."""
    doc = du.python_json(SCRAPE_LOADS)
    assert (doc["before"], doc["after"]) == (False, True)
    for line in (
        'binfmtd_probe_duration_seconds_count{arch="aarch64",result="ok"} 1.0',
        'binfmtd_repairs_total{action="register",reason="missing"} 1.0',
        'binfmtd_api_requests_total{code="200",endpoint="/v1/status"} 1.0',
    ):
        assert line in doc["text"], line


def test_probe_and_repair_families_read_as_prometheus_clients_own_instruments() -> None:
    """The probe histogram and the repairs counter, built at scrape time from plain counts,
    are byte for byte what a prometheus_client Histogram and Counter would expose for the
    same events (names, HELP, TYPE, labels, `le` bounds, `_bucket`/`_count`/`_sum`)."""
    durations = [0.0, 5.0, 10.0, 12.5, 99.0, 250.0, 2500.0, 99999.0]  # ms; some on a bound
    metrics = Metrics()
    registry = CollectorRegistry(auto_describe=True)
    histogram = Histogram(
        "binfmtd_probe_duration_seconds",
        "How long a verification probe ran, by arch and result.",
        ("arch", "result"),
        buckets=PROBE_BUCKETS,
        registry=registry,
    )
    counter = Counter(
        "binfmtd_repairs",
        "Changes a reconcile pass made, by action and reason.",
        ("action", "reason"),
        registry=registry,
    )
    for i, ms in enumerate(durations):
        state = "verified" if i % 3 else "failed"
        probe = wire.ProbeRecord(state == "verified", float(i), ms)
        metrics.observe_status(status(arch("riscv64", state, float(i), probe=probe)))
        histogram.labels("riscv64", "ok" if probe.ok else "failed").observe(ms / 1000)
    reasons = ["missing", "entry differs: flags PF != POF", "missing", "clobbered (by x)"]
    metrics.observe_actions(("register", r) for r in reasons)
    for r in reasons:
        counter.labels("register", reason_label(r)).inc()
    disable_created_metrics()  # type: ignore[no-untyped-call]  # no `*_created`, as exported
    try:
        expected = generate_latest(registry).decode()
    finally:
        enable_created_metrics()  # type: ignore[no-untyped-call]
    assert metrics.render().decode().startswith(expected)
