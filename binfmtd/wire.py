"""The wire contract: typed records for everything the API sends and `--oneshot --json` prints.

One definition shared by the daemon (which builds them), `binfmtctl` (which reads them), the
oneshot JSON and the tests. Stdlib-only and pure, so `binfmtctl` stays fast to start.

Compatibility rules, as Supervisor's `getProcessInfo` records keep them: every top-level record
carries `wire` (`WIRE_VERSION`); fields are only ever added (readers ignore keys they do not
know, and missing keys take the field's default), never renamed or re-typed within a version.
Times are Unix seconds (float), durations carry their unit in the name (`_ms`, `_s`).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from dataclasses import dataclass
    from typing import Any, ClassVar, TypeVar

    R = TypeVar("R", bound="Record")
else:
    # Type checkers see frozen dataclasses. At run time a dozen lines give the same behaviour
    # (positional/keyword init with defaults, frozen, ==, hash, repr) without importing
    # `dataclasses` and `typing`, which would double `binfmtctl`'s start-up time.

    def dataclass(*, frozen):
        """Make `cls` a frozen record of its annotated fields (ClassVar ones excluded)."""
        return _record


# 2: ArchRecord's `sha256` became `checksum` (named by algorithm, `blake3:<hex>`); a rename, so
# the version moved (1 had `sha256`, a bare hex SHA-256).
WIRE_VERSION = 2


def _record(cls: Any) -> Any:
    annotations = cls.__dict__.get("__annotations__", {})  # noqa: RUF063 - inspect is slow to import
    names = tuple(n for n, t in annotations.items() if not str(t).startswith("ClassVar"))
    defaults = {n: cls.__dict__[n] for n in names if n in cls.__dict__}

    known = frozenset(names)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        # Whole-dict operations, no loop over the fields: a publish builds ~100 records.
        if len(args) > len(names):
            raise TypeError(f"{cls.__name__} takes {len(names)} fields, got {len(args)}")
        given = dict(zip(names, args, strict=False))
        if not known.issuperset(kwargs) or not given.keys().isdisjoint(kwargs):
            key = next(k for k in kwargs if k not in known or k in given)
            raise TypeError(f"{cls.__name__}: unexpected or repeated field {key!r}")
        values = {**defaults, **given, **kwargs}
        if len(values) != len(names):
            missing = next(n for n in names if n not in values)
            raise TypeError(f"{cls.__name__}: missing field {missing!r}")
        self.__dict__.update(values)  # frozen: __setattr__ refuses, the instance dict does not

    cls.__init__ = __init__
    cls.__record_fields__ = names
    return cls


class Record:
    """Base of the records below: `to_json` and a tolerant `from_json`, frozen, compared by
    value. `_nested` names the fields holding records (a record, or a tuple of them); tuples of
    plain values become JSON lists and back."""

    __record_fields__: ClassVar[tuple[str, ...]] = ()
    _nested: ClassVar[dict[str, type[Record]]] = {}

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, n) for n in self.__record_fields__)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Record)
            and type(other) is type(self)
            and self._values() == other._values()
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, *map(_hashable, self._values())))

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__record_fields__)
        return f"{type(self).__name__}({inner})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen; build a new one")

    def replace(self: R, **changes: Any) -> R:
        """A copy with `changes` (use this, not `dataclasses.replace`: at run time these are not
        dataclasses, see the module's top)."""
        values = {n: getattr(self, n) for n in self.__record_fields__}
        return type(self)(**{**values, **changes})

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (nested records and tuples converted)."""
        return {n: _out(getattr(self, n)) for n in self.__record_fields__}

    @classmethod
    def from_json(cls: type[R], data: Any) -> R:
        """Build from decoded JSON; unknown keys are ignored, missing ones take defaults.
        Raises ValueError when `data` is not an object or a required key is missing."""
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        values = {n: cls._in(n, data[n]) for n in cls.__record_fields__ if n in data}
        try:
            return cls(**values)
        except TypeError as exc:
            raise ValueError(str(exc)) from None

    @classmethod
    def _in(cls, name: str, value: Any) -> Any:
        kind = cls._nested.get(name)
        if isinstance(value, list):
            return tuple(kind.from_json(v) if kind else v for v in value)
        if kind is not None and value is not None:
            return kind.from_json(value)
        return value


def _out(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, tuple | list):
        return [_out(v) for v in value]
    return value


def _hashable(value: Any) -> Any:
    return tuple(sorted(value.items())) if isinstance(value, dict) else value


class ExitError(Exception):
    """A failure that ends a command: the message for stderr and the exit code to return.
    The one exception class both `binfmtd` (preflight) and `binfmtctl` raise for that."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ApiError(Exception):
    """What the daemon's API methods raise to answer with an HTTP error status and a message
    (here rather than in `server`: the daemon raises it long before it loads the server)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- status ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeRecord(Record):
    """The last probe of one arch: passed or not, when (Unix s), how long, why it failed."""

    ok: bool
    at: float
    duration_ms: float
    error: str | None = None


@dataclass(frozen=True)
class HandlerRecord(Record):
    """The binfmt_misc entry the kernel uses for an arch's binaries now: its name, interpreter,
    and `owner` "binfmtd" (by the state file's record) or "foreign"."""

    entry: str
    interpreter: str
    owner: str


@dataclass(frozen=True)
class ArchRecord(Record):
    """One configured arch. `state` is one of `status.ArchState`'s values (e.g. "verified",
    "failed", "missing"); `working` says whether it may be advertised (a probe proved the entry
    as it is now); `conflict` that another tool's entry claims it and was left alone. `arch` is
    the QEMU name, `platforms` the OCI platforms it serves."""

    arch: str
    platforms: tuple[str, ...]
    state: str
    registered: bool
    enabled: bool
    flags: str
    interpreter: str | None
    checksum: str | None = None  # `blake3:<hex>` (`sha256:<hex>` from an old install)
    qemu_version: str | None = None
    probe: ProbeRecord | None = None
    error: str | None = None
    working: bool = False
    conflict: bool = False
    handler: HandlerRecord | None = None

    _nested: ClassVar[dict[str, type[Record]]] = {"probe": ProbeRecord, "handler": HandlerRecord}


@dataclass(frozen=True)
class DaemonRecord(Record):
    """The daemon itself: version, pid, start and last reconcile (Unix s), where it works."""

    version: str
    pid: int
    started_at: float | None = None
    sandbox: bool = False
    binfmt_misc: str | None = None
    ready: bool = False
    last_reconcile: float | None = None
    config: str | None = None
    reconcile_interval_s: float | None = None
    binfmt_misc_enabled: bool | None = None
    stale: bool = False
    stale_since: float | None = None
    failed_passes: int = 0
    sandbox_name: str | None = None  # --sandbox=NAME; None for the system daemon


@dataclass(frozen=True)
class WorkerPlatformRecord(Record):
    """One platform the worker was asked to serve or advertises.

    `source`: `verified` (binfmtd's verified set) or `buildkit` (BuildKit added it by itself).
    `proof`: `proven` (its probe ran as a RUN step through the worker), `refused` (BuildKit's
    own error in `reason`; left out of the worker's configuration), `proving`, `unproven` (no
    verdict yet, `reason` says why) or `pending`.
    """

    platform: str
    source: str = "verified"
    proof: str = "pending"
    reason: str | None = None


@dataclass(frozen=True)
class WorkerRecord(Record):
    """The supervised BuildKit worker (`GET /v1/worker`); `enabled: false` and nothing else
    set when `buildkit.enabled` is off. `state` is one of `supervision.WorkerState`'s values.

    `offered_platforms` are what buildx may use (advertised and proven); `refused_platforms`
    maps each refused platform to BuildKit's error; `output_tail` holds buildkitd's last output
    lines while it is failing; the `buildx_*` lines are set only while the worker runs
    (`buildx_append_command` only with a TCP listener)."""

    _nested: ClassVar[dict[str, type[Record]]] = {"platforms": WorkerPlatformRecord}

    enabled: bool = True
    state: str | None = None
    pid: int | None = None
    uptime_s: float | None = None
    restarts: int = 0
    failures: int = 0
    intended_platforms: tuple[str, ...] = ()
    running_platforms: tuple[str, ...] = ()
    advertised_platforms: tuple[str, ...] = ()
    differences: dict[str, Any] | None = None
    next_start_in_s: float | None = None
    last_error: str | None = None
    socket: str | None = None
    buildx_command: str | None = None
    binary: str | None = None
    platforms: tuple[WorkerPlatformRecord, ...] = ()
    offered_platforms: tuple[str, ...] = ()
    refused_platforms: dict[str, str] | None = None
    output_tail: tuple[str, ...] = ()
    tcp_address: str | None = None
    buildx_append_command: str | None = None


@dataclass(frozen=True)
class StatusRecord(Record):
    """`GET /v1/status`: the daemon, one record per configured arch, the native platforms, and
    `warnings` an operator must read (e.g. an entry carrying the C flag)."""

    daemon: DaemonRecord
    arches: tuple[ArchRecord, ...]
    native: tuple[str, ...] = ()
    worker: WorkerRecord | None = None
    warnings: tuple[str, ...] = ()
    native_proof: dict[str, str] | None = None
    wire: int = WIRE_VERSION

    _nested: ClassVar[dict[str, type[Record]]] = {
        "daemon": DaemonRecord,
        "arches": ArchRecord,
        "worker": WorkerRecord,
    }


@dataclass(frozen=True)
class PlatformsRecord(Record):
    """`GET /v1/platforms`: every platform that runs here now, native first."""

    platforms: tuple[str, ...]
    native: tuple[str, ...] = ()
    emulated: tuple[str, ...] = ()
    wire: int = WIRE_VERSION


@dataclass(frozen=True)
class BinfmtRecord(Record):
    """`GET /v1/platforms?format=binfmt`: exactly tonistiigi/binfmt's JSON (no `wire` key)."""

    supported: tuple[str, ...]
    emulators: tuple[str, ...]


@dataclass(frozen=True)
class HealthRecord(Record):
    """`GET /v1/health`: ok when ready and the loop published within its deadline."""

    ok: bool
    ready: bool
    last_tick_age_s: float
    wire: int = WIRE_VERSION


@dataclass(frozen=True)
class ErrorRecord(Record):
    """Every error answer: the HTTP status and what went wrong."""

    error: str
    status: int


# --- mutations ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult(Record):
    """`POST /v1/verify`: the arches whose probe passed and failed."""

    verified: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    disabled: tuple[str, ...] = ()  # disabled by the operator: not probed
    wire: int = WIRE_VERSION


@dataclass(frozen=True)
class ReconcileResult(Record):
    """`POST /v1/reconcile`: what the pass did, and errors by arch."""

    actions: tuple[str, ...] = ()
    errors: dict[str, str] | None = None
    wire: int = WIRE_VERSION


@dataclass(frozen=True)
class ArchChange(Record):
    """`POST /v1/arches/<name>/{enable,disable}`: the arch's QEMU name and state after."""

    arch: str
    state: str
    wire: int = WIRE_VERSION


@dataclass(frozen=True)
class ReloadResult(Record):
    """`POST /v1/reload`: the keys that changed and were applied, and those that changed but
    keep their running value until a restart."""

    reloaded: bool = True
    changed: tuple[str, ...] = ()
    needs_restart: tuple[str, ...] = ()
    wire: int = WIRE_VERSION


# --- discovery and --oneshot -------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint(Record):
    """One API endpoint: method, path, who may call it, what it answers."""

    method: str
    path: str
    access: str
    returns: str
    summary: str


@dataclass(frozen=True)
class IndexRecord(Record):
    """`GET /` and `GET /v1`: every endpoint."""

    endpoints: tuple[Endpoint, ...]
    wire: int = WIRE_VERSION

    _nested: ClassVar[dict[str, type[Record]]] = {"endpoints": Endpoint}


MEMBERS = "socket group"
ROOT = "root"

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("GET", "/v1", MEMBERS, "IndexRecord", "this list (also GET /)"),
    Endpoint("GET", "/v1/status", MEMBERS, "StatusRecord", "daemon and per-arch state"),
    Endpoint("GET", "/v1/platforms", MEMBERS, "PlatformsRecord", "platforms that run here"),
    Endpoint(
        "GET", "/v1/platforms?format=binfmt", MEMBERS, "BinfmtRecord", "tonistiigi/binfmt's shape"
    ),
    Endpoint("GET", "/v1/health", MEMBERS, "HealthRecord", "liveness of the reconcile loop"),
    Endpoint("GET", "/v1/worker", MEMBERS, "WorkerRecord", "the BuildKit worker"),
    Endpoint("GET", "/metrics", MEMBERS, "text/plain", "Prometheus metrics"),
    Endpoint("POST", "/v1/verify", ROOT, "VerifyResult", 'probe now; body {"arches": [...]}'),
    Endpoint("POST", "/v1/reconcile", ROOT, "ReconcileResult", "run a reconcile pass now"),
    Endpoint("POST", "/v1/arches/{name}/enable", ROOT, "ArchChange", "enable an arch's entry"),
    Endpoint("POST", "/v1/arches/{name}/disable", ROOT, "ArchChange", "disable an arch's entry"),
    Endpoint("POST", "/v1/reload", ROOT, "ReloadResult", "re-read the configuration"),
)


@dataclass(frozen=True)
class OneshotRecord(Record):
    """`binfmtd --oneshot --json`: timings (ms), actions taken, platforms, per-arch records."""

    sandbox: bool
    durations_ms: dict[str, float]
    actions: tuple[str, ...]
    native: tuple[str, ...]
    platforms: tuple[str, ...]
    arches: tuple[ArchRecord, ...]
    native_proof: dict[str, str] | None = None
    wire: int = WIRE_VERSION

    _nested: ClassVar[dict[str, type[Record]]] = {"arches": ArchRecord}
