"""Human renderings of wire records: the one arch table, the status page, the worker page.

Pure and stdlib-only (`binfmtctl` imports it). `binfmtctl status` and `binfmtd --oneshot` print
the same table from the same records.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from binfmtd.wire import ArchRecord, DaemonRecord, ProbeRecord, StatusRecord, WorkerRecord

ARCH_HEADER = ("ARCH", "PLATFORMS", "STATE", "FLAGS", "INTERPRETER", "VERIFIED")


def age(seconds: float) -> str:
    """A short human age: 42s, 5m, 3h, 2d."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, no trailing blanks."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def verified_cell(probe: ProbeRecord | None, now: float) -> str:
    """The VERIFIED column: when the last probe passed and how long it took, or that it failed."""
    if probe is None:
        return "never"
    when = f"{age(now - probe.at)} ago"
    return f"{when} ({probe.duration_ms:g} ms)" if probe.ok else f"failed {when}"


def arch_row(a: ArchRecord, now: float) -> list[str]:
    """One table row."""
    return [
        a.arch,
        ",".join(a.platforms) or "-",
        a.state,
        a.flags or "-",
        a.interpreter or "-",
        verified_cell(a.probe, now),
    ]


def arch_table(arches: Sequence[ArchRecord], now: float) -> str:
    """The per-arch table both `binfmtctl status` and `binfmtd --oneshot` print."""
    return table(ARCH_HEADER, [arch_row(a, now) for a in arches])


def arch_problem(a: ArchRecord) -> str | None:
    """Why an arch is not working (registered with F, enabled, proven), or None when it is."""
    if (a.working and "F" in a.flags) or a.state == "operator-disabled":
        return None  # the operator's own disable is the only one that is fine
    # A probe of a disabled entry fails by design: its error would only mislead here.
    probed = a.probe.error if a.probe and a.registered and a.enabled else None
    detail = a.error or probed
    if not a.registered:
        reason = "not registered"
    elif not a.enabled:
        reason = "registered but disabled"
    elif "F" not in a.flags:
        reason = f"registered without the F flag (flags {a.flags or 'none'})"
    else:
        reason = f"not verified (state {a.state})"
    return f"{reason}: {detail}" if detail else reason


def problems(arches: Sequence[ArchRecord]) -> list[str]:
    """One `ARCH: why` line per arch that is not working."""
    return [f"{a.arch}: {p}" for a in arches if (p := arch_problem(a))]


def check_problems(status: StatusRecord) -> list[str]:
    """Every reason `binfmtctl check` fails, one line each; empty means healthy."""
    head = [] if status.daemon.ready else ["binfmtd: not ready (first pass running)"]
    if status.daemon.stale:
        head.append(
            f"binfmtd: status is stale: the last {status.daemon.failed_passes} reconcile passes "
            "failed (see the daemon's log)"
        )
    return head + problems(status.arches)


def status_page(status: StatusRecord, now: float) -> str:
    """The human `binfmtctl status` page."""
    daemon = status.daemon
    last = daemon.last_reconcile
    lines = [
        f"binfmtd {daemon.version}, pid {daemon.pid}"
        + (" (sandbox)" if daemon.sandbox else "")
        + (", ready" if daemon.ready else ", starting")
        + (f", last reconcile {age(now - last)} ago" if last else ", not reconciled yet"),
        f"config {daemon.config}, binfmt_misc {daemon.binfmt_misc}",
        f"native: {', '.join(status.native) or '-'}",
        *(f"warning: {text}" for text in status.warnings),
        "",
        arch_table(status.arches, now),
    ]
    return "\n".join(lines + problems(status.arches))


def reload_hint(daemon: DaemonRecord | None) -> str:
    """How to make a running binfmtd re-read its configuration."""
    if daemon is not None and daemon.sandbox:
        return "binfmtctl reload"
    return "systemctl reload binfmtd"


def restart_hint(daemon: DaemonRecord | None) -> str:
    """How to restart a running binfmtd: systemd's unit, or a --sandbox daemon by hand."""
    if daemon is not None and daemon.sandbox:
        name = f"={daemon.sandbox_name}" if daemon.sandbox_name else ""
        config = f" --config {daemon.config}" if daemon.config else ""
        return f"stop it (kill {daemon.pid}) and run binfmtd --sandbox{name}{config} again"
    return "systemctl restart binfmtd"


def worker_disabled_hint(daemon: DaemonRecord | None) -> str:
    """What `binfmtctl worker` says when the worker is off: where to enable it, how to reload."""
    config = daemon.config if daemon is not None and daemon.config else DEFAULT_CONFIG
    return (
        f"hint: set `buildkit.enabled: true` in the configuration ({config}) and\n"
        f"      reload ({reload_hint(daemon)}). " + WORKER_DISABLED_HINT
    )


DEFAULT_CONFIG = "/etc/binfmtd/binfmtd.yaml"
WORKER_DISABLED_HINT = (
    "buildkitd is looked up on PATH (or set\n"
    "      buildkit.path); no distribution package ships it: take buildkitd from BuildKit's\n"
    "      release archives (https://github.com/moby/buildkit/releases), runc from your\n"
    "      distribution (apt-get install runc). Under systemd, install the drop-in with\n"
    "      scripts/install-service --with-buildkit."
)
WORKER_HEADER = ("PLATFORM", "FROM", "PROOF", "REASON")


def worker_exit_code(worker: WorkerRecord) -> int:
    """0 when disabled, or running with no platform refused or unproven; 1 otherwise."""
    if not worker.enabled:
        return 0
    if worker.state != "running":
        return 1
    return int(any(row.proof in ("refused", "unproven") for row in worker.platforms))


def worker_page(worker: WorkerRecord, daemon: DaemonRecord | None = None) -> str:
    """`binfmtctl worker`: summary, platform table (proven / refused with BuildKit's error,
    BuildKit's own additions named), buildkitd's last lines when failing, and the buildx
    lines only while the worker runs."""
    if not worker.enabled:
        return "worker: disabled (buildkit.enabled is false)\n" + worker_disabled_hint(daemon)
    parts = [_worker_summary(worker), _worker_table(worker)]
    parts += [p for p in (_offered(worker), _trouble(worker), _buildx(worker)) if p]
    return "\n\n".join(parts)


def _worker_summary(worker: WorkerRecord) -> str:
    facts = [f"pid {worker.pid}"] if worker.pid else []
    if worker.uptime_s is not None:
        facts.append(f"up {age(worker.uptime_s)}")
    facts.append(f"{worker.restarts} restarts, {worker.failures} failures")
    if worker.next_start_in_s is not None:
        facts.append(f"next start in {worker.next_start_in_s:g}s")
    lines = [
        f"worker: {worker.state or 'unknown'} ({', '.join(facts)})",
        f"buildkitd: {worker.binary or '-'}",
        f"socket: unix://{worker.socket or '-'}",
    ]
    if worker.tcp_address:
        lines.append(f"tcp: {worker.tcp_address} (mutual TLS)")
    return "\n".join(lines)


def _worker_table(worker: WorkerRecord) -> str:
    if not worker.platforms:
        return "platforms: none yet (no verified platform, or the worker has not answered)"
    rows = [
        [
            r.platform,
            "binfmtd" if r.source == "verified" else "BuildKit (added by itself)",
            r.proof,
            r.reason or "-",
        ]
        for r in worker.platforms
    ]
    return table(WORKER_HEADER, rows)


def _offered(worker: WorkerRecord) -> str:
    lines = [f"offered to buildx: {', '.join(worker.offered_platforms) or 'nothing'}"]
    refused = sorted(worker.refused_platforms or {})
    if refused:
        lines.append(
            f"refused by the worker: {', '.join(refused)} (left out of its configuration;"
            " tried again when the platform is verified anew or on reload)"
        )
    additions = [r.platform for r in worker.platforms if r.source != "verified"]
    if additions:
        lines.append(f"added by BuildKit itself: {', '.join(additions)}")
    return "\n".join(lines)


def _trouble(worker: WorkerRecord) -> str:
    lines = [f"last error: {worker.last_error}"] if worker.last_error else []
    if worker.output_tail:
        lines.append("buildkitd's last lines:")
        lines += [f"  {line}" for line in worker.output_tail]
    return "\n".join(lines)


def _buildx(worker: WorkerRecord) -> str:
    if worker.state != "running" or not worker.buildx_command:
        return ""
    lines = ["use it with:", f"  {worker.buildx_command}"]
    if worker.buildx_append_command:
        lines += [
            "add it to a builder on another machine (client certificate signed by tls_ca):",
            f"  {worker.buildx_append_command}",
        ]
    return "\n".join(lines)
