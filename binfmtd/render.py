"""Human renderings of wire records: the one arch table, the status page, the worker page.

Pure and stdlib-only (`binfmtctl` imports it). `binfmtctl status` and `binfmtd --oneshot` print
the same table from the same records.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from binfmtd.wire import ArchRecord, ProbeRecord, StatusRecord, WorkerRecord

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


def worker_page(worker: WorkerRecord) -> str:
    """The worker's state, platforms and the buildx command to use it."""
    if not worker.enabled:
        return "worker: disabled (set buildkit.enabled: true in the configuration)"
    diff = worker.differences or {}
    lines = [
        f"state: {worker.state or '-'}",
        f"pid: {worker.pid or '-'}",
        f"uptime: {'-' if worker.uptime_s is None else age(worker.uptime_s)}",
        f"restarts: {worker.restarts}, failures: {worker.failures}",
        f"socket: {worker.socket or '-'}",
        f"intended platforms: {', '.join(worker.intended_platforms) or '-'}",
        f"running platforms: {', '.join(worker.running_platforms) or '-'}",
        f"advertised platforms: {', '.join(worker.advertised_platforms) or '-'}",
    ]
    lines += [f"{key}: {', '.join(map(str, v))}" for key, v in diff.items() if v]
    if worker.next_start_in_s is not None:
        lines.append(f"next start in: {worker.next_start_in_s:g} s")
    if worker.last_error:
        lines.append(f"last error: {worker.last_error}")
    if worker.buildx_command:
        lines += ["", "use it with:", f"  {worker.buildx_command}"]
    return "\n".join(lines)
