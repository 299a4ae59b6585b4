"""`binfmtctl worker`: the BuildKit worker's page and exit code, from its `/v1/worker` JSON.

Stdlib-only and pure (binfmtctl imports it). The page says what the worker offers buildx and
why anything else is missing: per platform, whether a RUN step through the worker proved it
or BuildKit refused it (BuildKit's own error), which platforms BuildKit added by itself, the
last lines buildkitd printed when it is failing, and the `docker buildx create` lines only
while the worker runs.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any

DISABLED_HINT = (
    "hint: set `buildkit.enabled: true` in the configuration (/etc/binfmtd/binfmtd.yaml) and\n"
    "      reload (systemctl reload binfmtd). buildkitd is looked up on PATH (or set\n"
    "      buildkit.path); no distribution package ships it: take buildkitd from BuildKit's\n"
    "      release archives (https://github.com/moby/buildkit/releases), runc from your\n"
    "      distribution (apt-get install runc). Under systemd, install the drop-in with\n"
    "      scripts/install-service --with-buildkit."
)
PROBLEM_PROOFS = frozenset({"refused", "unproven"})


def exit_code(worker: Mapping[str, Any]) -> int:
    """0 when disabled, or running with no platform refused or unproven; 1 otherwise."""
    if not worker.get("enabled", True):
        return 0
    if worker.get("state") != "running":
        return 1
    rows = worker.get("platforms") or []
    return int(any(row.get("proof") in PROBLEM_PROOFS for row in rows))


def page(worker: Mapping[str, Any]) -> str:
    """The whole page: summary, platform table, failure details, buildx lines."""
    if not worker.get("enabled", True):
        return "worker: disabled (buildkit.enabled is false)\n" + DISABLED_HINT
    parts = [_summary(worker), _platform_table(worker.get("platforms") or [])]
    parts += [p for p in (_offered(worker), _trouble(worker), _buildx(worker)) if p]
    return "\n\n".join(parts)


def _summary(worker: Mapping[str, Any]) -> str:
    state = str(worker.get("state") or "unknown")
    facts = []
    if worker.get("pid"):
        facts.append(f"pid {worker['pid']}")
    if worker.get("uptime_s") is not None:
        facts.append(f"up {_duration(float(worker['uptime_s']))}")
    facts.append(f"{worker.get('restarts', 0)} restarts, {worker.get('failures', 0)} failures")
    if worker.get("next_start_in_s") is not None:
        facts.append(f"next start in {_duration(float(worker['next_start_in_s']))}")
    lines = [f"worker: {state} ({', '.join(facts)})"]
    lines.append(f"buildkitd: {worker.get('binary') or '-'}")
    lines.append(f"socket: unix://{worker.get('socket') or '-'}")
    if worker.get("tcp_address"):
        lines.append(f"tcp: {worker['tcp_address']} (mutual TLS)")
    return "\n".join(lines)


def _platform_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "platforms: none yet (no verified platform, or the worker has not answered)"
    header = ("PLATFORM", "FROM", "PROOF", "REASON")
    body = [
        (
            str(row["platform"]),
            "binfmtd" if row.get("source") == "verified" else "BuildKit (added by itself)",
            str(row.get("proof") or "-"),
            str(row.get("reason") or "-"),
        )
        for row in rows
    ]
    widths = [max(len(r[i]) for r in (header, *body)) for i in range(3)]
    return "\n".join(
        "  ".join([*(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)), r[3]]).rstrip()
        for r in (header, *body)
    )


def _offered(worker: Mapping[str, Any]) -> str:
    offered = worker.get("offered_platforms") or []
    lines = [f"offered to buildx: {', '.join(offered) or 'nothing'}"]
    refused = worker.get("refused_platforms") or {}
    if refused:
        lines.append(
            f"refused by the worker: {', '.join(sorted(refused))} (left out of its configuration;"
            " tried again when the platform is verified anew or on reload)"
        )
    additions = [
        r["platform"] for r in worker.get("platforms") or [] if r.get("source") != "verified"
    ]
    if additions:
        lines.append(f"added by BuildKit itself: {', '.join(additions)}")
    return "\n".join(lines)


def _trouble(worker: Mapping[str, Any]) -> str:
    lines = []
    if worker.get("last_error"):
        lines.append(f"last error: {worker['last_error']}")
    tail = worker.get("output_tail") or []
    if tail:
        lines.append("buildkitd's last lines:")
        lines += [f"  {line}" for line in tail]
    return "\n".join(lines)


def _buildx(worker: Mapping[str, Any]) -> str:
    if worker.get("state") != "running" or not worker.get("buildx_command"):
        return ""
    lines = ["use it with:", f"  {worker['buildx_command']}"]
    if worker.get("buildx_append_command"):
        lines += [
            "add it to a builder on another machine (client certificate signed by tls_ca):",
            f"  {worker['buildx_append_command']}",
        ]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
