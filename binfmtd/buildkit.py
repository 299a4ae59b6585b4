"""The BuildKit edge: buildkitd.toml rendering, the Control API calls, platform comparison.

`render_config`, `platform_diff`, `normalize_platform` and the `buildx_*` lines are pure;
`list_workers` and `solve_definition` are the only functions here that touch a socket (gRPC
over the worker's Unix socket).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shlex
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

LIST_WORKERS_METHOD = "/moby.buildkit.v1.Control/ListWorkers"
# Listening on every interface: the buildx line then names this host by its FQDN instead.
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]", ""})  # noqa: S104

# Platforms BuildKit adds to an amd64 worker by itself (x86-64 micro-architecture levels the
# host CPU supports), whatever the configured list says. They are named in the diff as
# BuildKit's additions rather than reported as unexpected or silently dropped.
AMD64_LEVELS = ("linux/amd64/v2", "linux/amd64/v3", "linux/amd64/v4")


# --- buildkitd.toml ----------------------------------------------------------------------------


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `override` laid over it; tables merge key by key, anything else is replaced."""
    merged: dict[str, Any] = dict(base)
    for key, value in override.items():
        current = merged.get(key)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            merged[key] = deep_merge(current, value)
        else:
            merged[key] = value
    return merged


def render_config(
    base: Mapping[str, Any],
    platforms: Sequence[str],
    *,
    containerd: bool,
    root: str,
    run_dir: str = "/run/binfmtd/buildkit",
    runtime: str | None = None,
) -> str:
    """buildkitd.toml text: the user's `base` (parsed with tomllib) with our keys forced on top.

    Our keys win over the user's: `root`, `[otel] socketPath` (under `run_dir`, not
    /run/buildkit, which a hardened unit cannot write), `[worker.oci] enabled = true` and
    `platforms`, and `[worker.containerd] enabled` and `platforms`. The platform lists are
    exactly `platforms` (the verified set less refusals) so BuildKit never falls back to
    auto-detecting emulators for the configured list. `runtime`, when given, is the OCI
    runtime's absolute path (`[worker.oci] binary`, BuildKit's `config.OCIConfig.Binary`), the
    one binfmtd checked, so buildkitd never looks runc up on its own. Every other key of
    `base` survives.
    """
    listed = list(platforms)
    oci: dict[str, Any] = {"enabled": True, "platforms": listed}
    if runtime is not None:
        oci["binary"] = runtime
    ours = {
        "root": root,
        "otel": {"socketPath": os.path.join(run_dir, "otel-grpc.sock")},
        "worker": {
            "oci": oci,
            "containerd": {"enabled": containerd, "platforms": listed},
        },
    }
    import tomli_w  # only for the worker

    return tomli_w.dumps(deep_merge(base, ours))


# --- platforms ---------------------------------------------------------------------------------


def normalize_platform(platform: str) -> str:
    """`os/arch[/variant]` in lower case, without the variants that only name the default.

    Matches containerd's normalization where it matters here: `arm64/v8` is `arm64` and
    `amd64/v1` is `amd64`; `arm` keeps its variant.
    """
    parts = platform.strip().lower().split("/")
    if len(parts) == 3 and (parts[1], parts[2]) in {("arm64", "v8"), ("amd64", "v1")}:
        parts = parts[:2]
    return "/".join(part for part in parts if part)


def platform_string(os_name: str, architecture: str, variant: str = "") -> str:
    """The normalized `os/arch[/variant]` string of a platform given by its fields."""
    return normalize_platform("/".join((os_name, architecture, variant)))


@dataclass(frozen=True)
class PlatformDiff:
    """How the advertised platforms differ from the intended ones."""

    missing: tuple[str, ...]
    extra: tuple[str, ...]
    buildkit_additions: tuple[str, ...]

    @property
    def matches(self) -> bool:
        """Whether the worker serves exactly what we intended, BuildKit's known additions aside."""
        return not self.missing and not self.extra

    def as_dict(self) -> dict[str, list[str]]:
        """JSON-ready form."""
        return {
            "missing": list(self.missing),
            "extra": list(self.extra),
            "buildkit_additions": list(self.buildkit_additions),
        }


def platform_diff(intended: Sequence[str], advertised: Sequence[str]) -> PlatformDiff:
    """Missing and extra platforms; amd64 levels BuildKit adds itself are named as such."""
    want = {normalize_platform(p) for p in intended}
    have = {normalize_platform(p) for p in advertised}
    surplus = have - want
    additions = {p for p in surplus if p in AMD64_LEVELS and "linux/amd64" in want}
    return PlatformDiff(
        missing=tuple(sorted(want - have)),
        extra=tuple(sorted(surplus - additions)),
        buildkit_additions=tuple(sorted(additions)),
    )


def buildx_command(name: str, socket_path: str) -> str:
    """The `docker buildx create` line for a one-node builder on this host's worker socket.

    No `--platform`: buildx then asks the worker for its platforms on every build, so the
    builder keeps following the proven set as it changes.
    """
    argv = ["docker", "buildx", "create", "--name", name, "--driver", "remote"]
    return shlex.join([*argv, f"unix://{socket_path}"])


def buildx_append_command(name: str, address: str, platforms: Sequence[str]) -> str:
    """The line another machine runs to add this worker as a node of its builder `name`.

    `--platform` routes those platforms to this node in a multi-node builder (the platforms
    this worker proved); the TLS files are the client's own, signed by the CA given to
    buildkitd as `tls_ca`.
    """
    host, _, port = address.rpartition(":")
    if host in WILDCARD_HOSTS:
        from socket import getfqdn

        host = getfqdn()
    argv = ["docker", "buildx", "create", "--append", "--name", name, "--driver", "remote"]
    argv += ["--node", f"{name}-{host.split('.')[0]}"]
    if platforms:
        argv += ["--platform", ",".join(platforms)]
    argv += ["--driver-opt", "cacert=CA.pem,cert=CLIENT-CERT.pem,key=CLIENT-KEY.pem"]
    return shlex.join([*argv, f"tcp://{host}:{port}"])


# --- ListWorkers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerRecord:
    """One worker as buildkitd reports it over ListWorkers."""

    id: str
    platforms: tuple[str, ...]
    labels: Mapping[str, str]


class WorkerUnreachable(RuntimeError):
    """ListWorkers did not answer; the message says what failed and where."""


def _record_from_pb(record: Any) -> WorkerRecord:
    platforms = tuple(platform_string(p.OS, p.Architecture, p.Variant) for p in record.platforms)
    return WorkerRecord(id=record.ID, platforms=platforms, labels=dict(record.Labels))


def _pb(name: str) -> ModuleType:
    """A generated module; their classes are built at import time, so typing sees them as Any."""
    return importlib.import_module(f"binfmtd.buildkit_pb.{name}")


def list_workers(socket_path: str, timeout: float) -> tuple[WorkerRecord, ...]:
    """Call `moby.buildkit.v1.Control/ListWorkers` on `unix://<socket_path>`."""

    import grpc

    control_pb2, control_pb2_grpc = _pb("control_pb2"), _pb("control_pb2_grpc")
    target = f"unix://{socket_path}"
    try:
        with grpc.insecure_channel(target) as channel:
            stub = control_pb2_grpc.ControlStub(channel)
            response = stub.ListWorkers(control_pb2.ListWorkersRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        raise WorkerUnreachable(_rpc_message(exc, target)) from exc
    return tuple(_record_from_pb(r) for r in response.record)


def _rpc_message(exc: Any, target: str) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    name = code.name if code is not None else "UNKNOWN"
    return f"ListWorkers on {target} failed: {name}: {details}"


# --- Solve (the proof through the worker) --------------------------------------------------------

NO_VERDICT_CODES = frozenset({"UNAVAILABLE", "CANCELLED", "UNKNOWN_JOB"})
STATUS_JOIN_S = 10.0  # the Status stream ends with the job; a loaded host may lag behind


@dataclass(frozen=True)
class SolveOutcome:
    """One inline-definition solve: BuildKit's verdict and what the named step printed.

    `error` is BuildKit's own message (the gRPC status details), followed by the step's last
    output line when it printed one (the real cause, e.g. `exec format error`, is only there).
    `conclusive` is False when BuildKit gave no verdict (socket gone, call cancelled);
    `output_complete` is False when the Status stream did not end in time (the output may
    lack lines the step printed).
    """

    ok: bool
    output: str
    error: str | None = None
    conclusive: bool = True
    output_complete: bool = True


class _StatusLog:
    """Collects the Control/Status stream of one ref: vertex names, errors and logs."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.logs: dict[str, list[bytes]] = {}
        self.complete = False

    def follow(self, stream: Any) -> None:
        import grpc

        with contextlib.suppress(grpc.RpcError):
            for response in stream:
                for vertex in response.vertexes:
                    self.names[vertex.digest] = vertex.name
                    if vertex.error:
                        self.errors[vertex.digest] = vertex.error
                for entry in response.logs:
                    self.logs.setdefault(entry.vertex, []).append(entry.msg)
            self.complete = True

    def output_of(self, name: str) -> str:
        """Everything the vertex called `name` printed, stdout and stderr interleaved."""
        chunks = [b"".join(self.logs.get(d, [])) for d, n in self.names.items() if n == name]
        return b"".join(chunks).decode(errors="replace")


def solve_definition(
    socket_path: str, definition: bytes, step_name: str, timeout: float
) -> SolveOutcome:
    """Control/Solve an inline `pb.Definition` (no session, no exporter, `Internal`).

    The Status stream of the same ref is followed alongside, so the output of the step named
    `step_name` comes back with the verdict.
    """
    import secrets

    import grpc

    control_pb2, control_pb2_grpc = _pb("control_pb2"), _pb("control_pb2_grpc")
    ops_pb2 = _pb("ops_pb2")
    ref = f"binfmtd-proof-{secrets.token_hex(10)}"
    request = control_pb2.SolveRequest(
        Ref=ref, Definition=ops_pb2.Definition.FromString(definition), Internal=True
    )
    status = _StatusLog()
    with grpc.insecure_channel(f"unix://{socket_path}") as channel:
        stub = control_pb2_grpc.ControlStub(channel)
        stream = stub.Status(control_pb2.StatusRequest(Ref=ref), timeout=timeout)
        follower = threading.Thread(target=status.follow, args=(stream,), daemon=True)
        follower.start()
        try:
            stub.Solve(request, timeout=timeout)
            error = None
        except grpc.RpcError as exc:
            error = exc
        follower.join(STATUS_JOIN_S)
        stream.cancel()
    output = status.output_of(step_name)
    if error is None:
        return SolveOutcome(ok=True, output=output, output_complete=status.complete)
    return _failed_solve(error, output, timeout)


def _failed_solve(exc: Any, output: str, timeout: float) -> SolveOutcome:
    code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == "DEADLINE_EXCEEDED":
        details = f"no verdict within {timeout:g} s"
    last = [line for line in output.splitlines() if line.strip()][-1:]
    message = details + (f" ({last[0].strip()})" if last and last[0] not in details else "")
    no_verdict = code in NO_VERDICT_CODES or "no such job" in details
    return SolveOutcome(ok=False, output=output, error=message, conclusive=not no_verdict)
