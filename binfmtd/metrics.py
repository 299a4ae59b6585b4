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

import bisect
import contextlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from binfmtd import wire

if TYPE_CHECKING:
    from prometheus_client.core import Metric
    from prometheus_client.registry import CollectorRegistry

# Every state `status.ArchState` and `supervision.WorkerState` may take is exported as a
# series once seen; these are exported from the start, so a dashboard has all of them at 0.
KNOWN_STATES = ("verified", "foreign-verified", "unverified", "failed", "disabled", "missing")
PROBE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def reason_label(reason: str) -> str:
    """A bounded label from a free-text reason: the part before any detail in parentheses."""
    return reason.split(" (", 1)[0].split(":", 1)[0][:60]


class _Histogram:
    """One probe histogram series: observations per bucket (not cumulative), their sum."""

    def __init__(self) -> None:
        self.counts = [0] * (len(PROBE_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        """Count one observation in the first bucket whose bound is >= `seconds`."""
        self.counts[bisect.bisect_left(PROBE_BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[float]:
        """Per bucket (`le` order, +Inf last), the observations at or below its bound."""
        running, out = 0, []
        for count in self.counts:
            running += count
            out.append(float(running))
        return out


class Metrics:
    """The daemon's metrics. `observe_status`, `observe_actions` and `observe_request` are
    called by the daemon and the API server (any thread); `render` is the exposition text.

    Events are counted in plain Python data; prometheus_client (whose import loads an HTTP
    server, urllib and ssl: ~12 MB of RSS and ~20 ms) is imported on the first scrape or when
    `serve_tcp` starts, and builds every family from that data at scrape time."""

    def __init__(self) -> None:
        self._status: wire.StatusRecord | None = None
        self._probe_at: dict[str, float] = {}
        self._states_seen: set[str] = set(KNOWN_STATES)
        self._lock = threading.Lock()
        self._probes: dict[tuple[str, str], _Histogram] = {}  # (arch, result), first seen first
        self._repairs: dict[tuple[str, str], int] = {}  # (action, reason label)
        # Counted on the API thread for every answer, so a plain dict (one writer) rather than
        # a locked counter per request; exported by the collector at scrape time.
        self._requests: dict[tuple[str, int], int] = {}
        self._registry: CollectorRegistry | None = None
        self._registry_lock = threading.Lock()
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
                    key = (arch.arch, "ok" if probe.ok else "failed")
                    series = self._probes.get(key) or self._probes.setdefault(key, _Histogram())
                    series.observe(probe.duration_ms / 1000)
            self._status = status

    def observe_actions(self, actions: Iterable[tuple[str, str]]) -> None:
        """Count the (action kind, reason) pairs one pass carried out."""
        with self._lock:
            for kind, reason in actions:
                key = (kind, reason_label(reason))
                self._repairs[key] = self._repairs.get(key, 0) + 1

    def observe_request(self, endpoint: str, code: int) -> None:
        """Count one answered API request (only the API server's thread calls this)."""
        key = (endpoint, code)
        self._requests[key] = self._requests.get(key, 0) + 1

    def request_counts(self) -> dict[tuple[str, int], int]:
        """Answered requests so far by (endpoint template, status), a copy."""
        return dict(self._requests)

    def probe_counts(self) -> dict[tuple[str, str], tuple[list[float], float]]:
        """Per (arch, result): the cumulative bucket counts (+Inf last) and the sum (s)."""
        with self._lock:
            return {k: (h.cumulative(), h.total) for k, h in self._probes.items()}

    def repair_counts(self) -> dict[tuple[str, str], int]:
        """Repairs so far by (action, reason label), a copy."""
        with self._lock:
            return dict(self._repairs)

    # --- out ------------------------------------------------------------------------------

    @property
    def registry(self) -> CollectorRegistry:
        """The prometheus_client registry serving these metrics (made, and prometheus_client
        imported, on first use)."""
        with self._registry_lock:
            if self._registry is None:
                from prometheus_client import CollectorRegistry

                registry = CollectorRegistry(auto_describe=True)
                registry.register(_collector(self))
                self._registry = registry
            return self._registry

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4)."""
        from prometheus_client import generate_latest

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


def _collector(metrics: Metrics) -> Any:
    """A prometheus_client collector building every family from `metrics` at scrape time
    (defined here so that prometheus_client is imported only when a registry is made)."""
    from prometheus_client.registry import Collector

    class _MetricsCollector(Collector):
        def describe(self) -> Iterable[Metric]:
            return []

        def collect(self) -> Iterator[Metric]:
            return _families(metrics)

    return _MetricsCollector()


def _families(metrics: Metrics) -> Iterator[Metric]:
    """Every family, in the order (and with the names, help, types and labels) the daemon has
    always exported them."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    yield _probe_histogram(metrics.probe_counts())
    repairs = CounterMetricFamily(
        "binfmtd_repairs",
        "Changes a reconcile pass made, by action and reason.",
        labels=["action", "reason"],
    )
    for (action, reason), count in metrics.repair_counts().items():
        repairs.add_metric([action, reason], float(count))
    yield repairs
    status, states = metrics.snapshot()
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
    yield _requests(metrics.request_counts())
    yield from _daemon_metrics(status)
    if status is not None and status.worker is not None and status.worker.enabled:
        yield from _worker_metrics(status.worker)


def _probe_histogram(series: dict[tuple[str, str], tuple[list[float], float]]) -> Metric:
    from prometheus_client.core import HistogramMetricFamily
    from prometheus_client.utils import floatToGoString

    family = HistogramMetricFamily(
        "binfmtd_probe_duration_seconds",
        "How long a verification probe ran, by arch and result.",
        labels=["arch", "result"],
    )
    bounds = [floatToGoString(b) for b in (*PROBE_BUCKETS, float("inf"))]  # type: ignore[no-untyped-call]
    for (arch, result), (cumulative, total) in series.items():
        family.add_metric([arch, result], list(zip(bounds, cumulative, strict=True)), total)
    return family


def _arch_states(arches: Sequence[wire.ArchRecord], states: Sequence[str]) -> Metric:
    from prometheus_client.core import GaugeMetricFamily

    family = GaugeMetricFamily(
        "binfmtd_arch_state", "1 for the arch's current state.", labels=["arch", "state"]
    )
    for a in arches:
        for state in states:
            family.add_metric([a.arch, state], 1.0 if a.state == state else 0.0)
    return family


def _requests(counts: dict[tuple[str, int], int]) -> Metric:
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily(
        "binfmtd_api_requests",
        "Answered API requests, by endpoint template and HTTP status code.",
        labels=["endpoint", "code"],
    )
    for (endpoint, code), count in sorted(counts.items()):
        family.add_metric([endpoint, str(code)], count)
    return family


def _daemon_metrics(status: wire.StatusRecord | None) -> Iterator[Metric]:
    from prometheus_client.core import GaugeMetricFamily

    ready = status is not None and status.daemon.ready
    yield GaugeMetricFamily("binfmtd_ready", "1 once the first pass finished.", ready * 1.0)
    last = status.daemon.last_reconcile if status else None
    if last is not None:
        yield GaugeMetricFamily(
            "binfmtd_last_reconcile_timestamp_seconds", "When the last pass finished.", last
        )


def _worker_metrics(worker: wire.WorkerRecord) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from binfmtd.supervision import WorkerState  # only with a worker: a dozen dataclasses

    known = [s.value for s in WorkerState]
    state = GaugeMetricFamily(
        "binfmtd_worker_state", "1 for the BuildKit worker's state.", labels=["state"]
    )
    for name in (*known, *({worker.state} - set(known))):
        state.add_metric([str(name)], 1.0 if name == worker.state else 0.0)
    yield state
    yield CounterMetricFamily(
        "binfmtd_worker_restarts", "Restarts of the BuildKit worker.", worker.restarts
    )
