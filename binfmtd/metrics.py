"""Prometheus metrics, built with prometheus-client: `GET /metrics` on the API socket, and
optionally a loopback TCP port (`api.metrics_port`) for node-exporter-style scraping.

State (per-arch state, conflicts, worker state and restarts, readiness) is read from the last
published `wire.StatusRecord`, so a scrape shows exactly what `binfmtctl status` shows. Events
are counted as they happen: probes (from new probe records in that status), repairs (from each
pass's actions) and API requests (from the server). One registry per daemon, no global state.

Metric names (all prefixed `binfmtd_`):
  arch_state{arch,state}              1 for the arch's current state, 0 for the others
  arch_working{arch}                  1 when the arch may be advertised (a probe proved it)
  probe_duration_seconds{arch,result} histogram of probe run times (result: ok, failed)
  repairs_total{action,reason}        entries installed, registered, removed, re-enabled
  conflicts{arch}                     1 per arch whose entry another tool made (left alone)
  worker_state{state}                 1 for the BuildKit worker's state (absent when disabled)
  worker_restarts_total               restarts of the worker since the daemon started
  api_requests_total{endpoint,code}   answered requests by endpoint template and HTTP status
  ready                               1 once the first pass finished
  last_reconcile_timestamp_seconds    when the last pass finished (Unix s)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from binfmtd import wire
from binfmtd.supervision import WorkerState

# Every state `status.ArchState` and `supervision.WorkerState` may take is exported as a
# series once seen; these are exported from the start, so a dashboard has all of them at 0.
KNOWN_STATES = ("verified", "foreign-verified", "unverified", "failed", "disabled", "missing")
_WORKER_STATES = frozenset(s.value for s in WorkerState)
PROBE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def reason_label(reason: str) -> str:
    """A bounded label from a free-text reason: the part before any detail in parentheses."""
    return reason.split(" (", 1)[0].split(":", 1)[0][:60]


class Metrics:
    """The daemon's metrics. `observe_status`, `observe_actions` and `observe_request` are
    called by the daemon and the API server (any thread); `render` is the exposition text."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no `*_created` series
        self.registry = CollectorRegistry(auto_describe=True)
        self._status: wire.StatusRecord | None = None
        self._probe_at: dict[str, float] = {}
        self._states_seen: set[str] = set(KNOWN_STATES)
        self._lock = threading.Lock()
        self.probe_seconds = Histogram(
            "binfmtd_probe_duration_seconds",
            "How long a verification probe ran, by arch and result.",
            ("arch", "result"),
            buckets=PROBE_BUCKETS,
            registry=self.registry,
        )
        self.repairs = Counter(
            "binfmtd_repairs",
            "Changes a reconcile pass made, by action and reason.",
            ("action", "reason"),
            registry=self.registry,
        )
        # Counted on the API thread for every answer, so a plain dict (one writer) rather than
        # a locked Counter child per request; exported by the collector at scrape time.
        self._requests: dict[tuple[str, int], int] = {}
        self.registry.register(_StateCollector(self))
        self._http: Any = None

    # --- events in ------------------------------------------------------------------------

    def observe_status(self, status: wire.StatusRecord) -> None:
        """Adopt the newly published status; count every probe that ran since the last one."""
        with self._lock:
            for arch in status.arches:
                self._states_seen.add(arch.state)
                probe = arch.probe
                if probe is not None and self._probe_at.get(arch.arch) != probe.at:
                    self._probe_at[arch.arch] = probe.at
                    result = "ok" if probe.ok else "failed"
                    self.probe_seconds.labels(arch.arch, result).observe(probe.duration_ms / 1000)
            self._status = status

    def observe_actions(self, actions: Iterable[tuple[str, str]]) -> None:
        """Count the (action kind, reason) pairs one pass carried out."""
        for kind, reason in actions:
            self.repairs.labels(kind, reason_label(reason)).inc()

    def observe_request(self, endpoint: str, code: int) -> None:
        """Count one answered API request (only the API server's thread calls this)."""
        key = (endpoint, code)
        self._requests[key] = self._requests.get(key, 0) + 1

    def request_counts(self) -> dict[tuple[str, int], int]:
        """Answered requests so far by (endpoint template, status), a copy."""
        return dict(self._requests)

    # --- out ------------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4)."""
        return generate_latest(self.registry)

    def serve_tcp(self, port: int, addr: str = "127.0.0.1") -> None:
        """Also serve the metrics on a loopback TCP port (raises OSError when it cannot bind)."""
        from prometheus_client import start_http_server

        self._http = start_http_server(port, addr=addr, registry=self.registry)

    @property
    def tcp_port(self) -> int | None:
        """The loopback TCP port serving the metrics, if any."""
        return None if self._http is None else int(self._http[0].server_port)

    def close(self) -> None:
        """Stop the TCP listener, if any."""
        if self._http is not None:
            server, thread = self._http
            with contextlib.suppress(OSError):
                server.shutdown()
                server.server_close()
            thread.join(timeout=5)
            self._http = None

    def snapshot(self) -> tuple[wire.StatusRecord | None, Sequence[str]]:
        """The status and the states seen so far, for the collector."""
        with self._lock:
            return self._status, sorted(self._states_seen)


class _StateCollector(Collector):
    """Gauges derived from the last published status, computed at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        status, states = self._metrics.snapshot()
        arches = status.arches if status else ()
        yield _arch_states(arches, states)
        working = GaugeMetricFamily(
            "binfmtd_arch_working", "1 when the arch may be advertised.", labels=["arch"]
        )
        conflicts = GaugeMetricFamily(
            "binfmtd_conflicts",
            "1 per arch whose binfmt_misc entry another tool made (left alone).",
            labels=["arch"],
        )
        for a in arches:
            working.add_metric([a.arch], 1.0 if a.working else 0.0)
            conflicts.add_metric([a.arch], 1.0 if a.conflict else 0.0)
        yield working
        yield conflicts
        yield _requests(self._metrics.request_counts())
        yield from _daemon_metrics(status)
        if status is not None and status.worker is not None and status.worker.enabled:
            yield from _worker_metrics(status.worker)


def _arch_states(arches: Sequence[wire.ArchRecord], states: Sequence[str]) -> Metric:
    family = GaugeMetricFamily(
        "binfmtd_arch_state", "1 for the arch's current state.", labels=["arch", "state"]
    )
    for a in arches:
        for state in states:
            family.add_metric([a.arch, state], 1.0 if a.state == state else 0.0)
    return family


def _requests(counts: dict[tuple[str, int], int]) -> Metric:
    family = CounterMetricFamily(
        "binfmtd_api_requests",
        "Answered API requests, by endpoint template and HTTP status code.",
        labels=["endpoint", "code"],
    )
    for (endpoint, code), count in sorted(counts.items()):
        family.add_metric([endpoint, str(code)], count)
    return family


def _daemon_metrics(status: wire.StatusRecord | None) -> Iterator[Metric]:
    ready = status is not None and status.daemon.ready
    yield GaugeMetricFamily("binfmtd_ready", "1 once the first pass finished.", ready * 1.0)
    last = status.daemon.last_reconcile if status else None
    if last is not None:
        yield GaugeMetricFamily(
            "binfmtd_last_reconcile_timestamp_seconds", "When the last pass finished.", last
        )


def _worker_metrics(worker: wire.WorkerRecord) -> Iterator[Metric]:
    state = GaugeMetricFamily(
        "binfmtd_worker_state", "1 for the BuildKit worker's state.", labels=["state"]
    )
    for name in (*(s.value for s in WorkerState), *({worker.state} - _WORKER_STATES)):
        state.add_metric([str(name)], 1.0 if name == worker.state else 0.0)
    yield state
    yield CounterMetricFamily(
        "binfmtd_worker_restarts", "Restarts of the BuildKit worker.", worker.restarts
    )
