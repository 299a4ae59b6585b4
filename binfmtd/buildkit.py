"""The BuildKit edge: buildkitd.toml rendering, the ListWorkers call, and platform comparison.

`render_config`, `platform_diff`, `normalize_platform` and `buildx_command` are pure;
`list_workers` is the only function here that touches a socket (gRPC over a Unix socket).
"""

from __future__ import annotations

import importlib
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import tomli_w

DEFAULT_SOCKET = "/run/binfmtd/buildkitd.sock"
LIST_WORKERS_METHOD = "/moby.buildkit.v1.Control/ListWorkers"

# Platforms BuildKit adds to an amd64 worker by itself (x86-64 micro-architecture levels the
# host CPU supports), whatever the configured list says. They are named in the diff as
# BuildKit's additions rather than reported as unexpected or silently dropped.
AMD64_LEVELS = ("linux/amd64/v2", "linux/amd64/v3", "linux/amd64/v4")


@dataclass(frozen=True)
class BuildkitConfig:
    """The `buildkit:` section of the daemon configuration, parsed once."""

    enabled: bool = False
    path: str = "buildkitd"
    socket: str = DEFAULT_SOCKET
    state_dir: str = "/var/lib/binfmtd/buildkit"
    config_path: str = "/run/binfmtd/buildkitd.toml"
    base_config: str | None = None
    extra_args: tuple[str, ...] = ()
    containerd_worker: bool = False
    socket_group: str | None = "binfmtd"
    grace_s: float = 30.0
    debounce_s: float = 2.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    max_failures: int = 5
    start_timeout_s: float = 30.0
    health_interval_s: float = 5.0
    stable_s: float = 60.0


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
    base: Mapping[str, Any], platforms: Sequence[str], *, containerd: bool, root: str
) -> str:
    """buildkitd.toml text: the user's `base` (parsed with tomllib) with our keys forced on top.

    Our keys win over the user's: `root`, `[worker.oci] enabled = true` and `platforms`, and
    `[worker.containerd] enabled` and `platforms`. The platform lists are exactly `platforms`
    (the verified set) so BuildKit never falls back to auto-detecting emulators. Every other key
    of `base` survives unchanged.
    """
    listed = list(platforms)
    ours = {
        "root": root,
        "worker": {
            "oci": {"enabled": True, "platforms": listed},
            "containerd": {"enabled": containerd, "platforms": listed},
        },
    }
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


def buildx_command(name: str, socket_path: str, platforms: Sequence[str]) -> str:
    """The `docker buildx create` line that points buildx at this worker."""
    argv = ["docker", "buildx", "create", "--name", name, "--driver", "remote"]
    if platforms:
        argv += ["--platform", ",".join(platforms)]
    argv.append(f"unix://{socket_path}")
    return shlex.join(argv)


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
