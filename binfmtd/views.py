"""The daemon's side of the wire contract: `wire` records built from the engine's state.

Used by the daemon loop (`service`) to publish, and by `binfmtd --oneshot --json`.
"""

from __future__ import annotations

from typing import Any

from binfmtd import wire
from binfmtd.engine import Engine
from binfmtd.plan import describe
from binfmtd.status import ArchState, ArchStatus


def probe_record(status: ArchStatus) -> wire.ProbeRecord | None:
    """The last probe of `status`'s arch, if one ran."""
    result = status.probe
    if result is None:
        return None
    return wire.ProbeRecord(result.ok, result.at, round(result.duration_ms, 1), result.error)


def arch_record(status: ArchStatus, conflict: bool = False) -> wire.ArchRecord:
    """One arch as the API and `--oneshot --json` show it."""
    return wire.ArchRecord(
        arch=status.arch,
        platforms=tuple(status.platforms),
        state=str(status.state),
        registered=status.registered,
        enabled=status.enabled,
        flags=status.flags,
        interpreter=status.interpreter,
        checksum=status.checksum,
        qemu_version=status.qemu_version,
        probe=probe_record(status),
        error=status.error,
        working=status.state.working,
        conflict=conflict,
        handler=None
        if status.handler is None
        else wire.HandlerRecord(
            status.handler.name, status.handler.interpreter, status.owner.value
        ),
    )


# States in which another tool's entry is in the way (left alone under conflict_policy: leave).
CONFLICTS = frozenset(
    {
        ArchState.FOREIGN,
        ArchState.FOREIGN_DISABLED,
        ArchState.SHADOWED_BY_FOREIGN,
        ArchState.NATIVE_SHADOWED,
    }
)


def arch_records(engine: Engine) -> tuple[wire.ArchRecord, ...]:
    """Every selected arch, in catalog order."""
    return tuple(arch_record(s, s.state in CONFLICTS) for s in engine.statuses())


def platforms_record(engine: Engine) -> wire.PlatformsRecord:
    """What runs here now: native platforms first, then the proven emulated ones."""
    native = engine.native_platforms()
    verified = engine.verified_platforms()
    emulated = tuple(p for p in verified if p not in native)
    return wire.PlatformsRecord(tuple(verified), tuple(native), emulated)


def binfmt_record(engine: Engine, arches: tuple[wire.ArchRecord, ...]) -> wire.BinfmtRecord:
    """tonistiigi/binfmt's shape: supported platforms and the registered emulators."""
    emulators = sorted(f"qemu-{a.arch}" for a in arches if a.registered)
    return wire.BinfmtRecord(tuple(engine.verified_platforms()), tuple(emulators))


def oneshot_record(
    engine: Engine, actions: list[Any], durations_ms: dict[str, float], *, sandbox: bool
) -> wire.OneshotRecord:
    """What `binfmtd --oneshot --json` prints."""
    return wire.OneshotRecord(
        sandbox=sandbox,
        durations_ms=durations_ms,
        actions=tuple(describe(a) for a in actions),
        native=tuple(engine.native),
        platforms=tuple(engine.verified_platforms()),
        arches=arch_records(engine),
        native_proof=dict(engine.native_proof),
    )
