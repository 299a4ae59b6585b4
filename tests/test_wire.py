"""The wire records: round trips, tolerance to new and missing fields, frozen values."""

from __future__ import annotations

import json

import pytest

from binfmtd import wire

PROBE = wire.ProbeRecord(True, 1_700_000_000.0, 12.5)
ARCH = wire.ArchRecord(
    "aarch64", ("linux/arm64",), "verified", True, True, "POF", "/q", probe=PROBE, working=True
)
STATUS = wire.StatusRecord(
    wire.DaemonRecord("0.1.0", 42, ready=True),
    (ARCH,),
    ("linux/amd64",),
    wire.WorkerRecord(state="running", intended_platforms=("linux/arm64",)),
    ("entry qemu-x has the C flag",),
)
SAMPLES: list[wire.Record] = [
    STATUS,
    wire.PlatformsRecord(("linux/amd64", "linux/arm64"), ("linux/amd64",), ("linux/arm64",)),
    wire.BinfmtRecord(("linux/arm64",), ("qemu-aarch64",)),
    wire.HealthRecord(True, True, 0.2),
    wire.VerifyResult(("aarch64",), ("mips",)),
    wire.ReconcileResult(("register qemu-aarch64",), {"s390x": "boom"}),
    wire.ArchChange("aarch64", "disabled"),
    wire.ReloadResult(True, ("arches",), ("api",)),
    wire.IndexRecord(wire.ENDPOINTS),
    wire.OneshotRecord(False, {"total": 1.0}, ("install s390x",), ("x86_64",), (), (ARCH,)),
    wire.ErrorRecord("no", 404),
]


@pytest.mark.parametrize("record", SAMPLES, ids=lambda r: type(r).__name__)
def test_round_trip_through_json(record: wire.Record) -> None:
    """to_json -> JSON text -> from_json gives an equal record (nested records included)."""
    again = type(record).from_json(json.loads(json.dumps(record.to_json())))
    assert again == record and hash(again) == hash(record)


def test_readers_ignore_new_fields_and_default_missing_ones() -> None:
    """A newer daemon's extra keys are ignored; an older one's missing optional keys default."""
    data = ARCH.to_json() | {"added_in_wire_2": [1, 2]}
    del data["working"], data["conflict"]
    arch = wire.ArchRecord.from_json(data)
    assert arch.replace(working=True) == ARCH
    with pytest.raises(ValueError, match="missing field 'state'"):
        wire.ArchRecord.from_json({"arch": "x", "platforms": []})
    with pytest.raises(ValueError, match="expected a JSON object"):
        wire.StatusRecord.from_json([])


def test_records_are_frozen_values() -> None:
    """Records cannot be changed in place; equality is by value and type; every top-level
    record carries the wire version."""
    with pytest.raises(AttributeError, match="frozen"):
        ARCH.state = "failed"  # type: ignore[misc]
    assert ARCH.replace(state="failed") != ARCH
    assert wire.ArchChange("a", "b") != wire.ErrorRecord("a", 1)
    assert all(r.to_json().get("wire", wire.WIRE_VERSION) == wire.WIRE_VERSION for r in SAMPLES)
    assert "wire" not in wire.BinfmtRecord((), ()).to_json()  # tonistiigi/binfmt's exact shape


def test_records_are_built_like_dataclasses() -> None:
    """Positional and keyword fields with defaults, as the type checker's dataclass view says;
    a wrong call names the field and builds nothing."""
    probe = wire.ProbeRecord(True, at=1.0, duration_ms=2.0)
    assert probe == wire.ProbeRecord(True, 1.0, 2.0)
    assert wire.ArchChange("aarch64", "disabled").wire == wire.WIRE_VERSION  # a default
    with pytest.raises(TypeError, match="ProbeRecord: unexpected or repeated field 'ok'"):
        wire.ProbeRecord(True, 1.0, 2.0, ok=False)  # type: ignore[misc]
    with pytest.raises(TypeError, match="ProbeRecord: unexpected or repeated field 'okay'"):
        wire.ProbeRecord(okay=True, at=1.0, duration_ms=2.0)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="ArchChange: missing field 'state'"):
        wire.ArchChange("aarch64")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="ArchChange takes 3 fields, got 4"):
        wire.ArchChange("a", "b", 2, "d")  # type: ignore[call-arg]


# Every record's fields as WIRE_VERSION 2 shipped them. Within a version a field may only be
# added (appended here), never renamed or removed: that changes WIRE_VERSION and this table.
FIELDS_OF_VERSION = {
    2: {
        "ArchChange": ("arch", "state", "wire"),
        "ArchRecord": (
            "arch",
            "platforms",
            "state",
            "registered",
            "enabled",
            "flags",
            "interpreter",
            "checksum",
            "qemu_version",
            "probe",
            "error",
            "working",
            "conflict",
            "handler",
        ),
        "BinfmtRecord": ("supported", "emulators"),
        "DaemonRecord": (
            "version",
            "pid",
            "started_at",
            "sandbox",
            "binfmt_misc",
            "ready",
            "last_reconcile",
            "config",
            "reconcile_interval_s",
            "binfmt_misc_enabled",
            "stale",
            "stale_since",
            "failed_passes",
            "sandbox_name",
        ),
        "Endpoint": ("method", "path", "access", "returns", "summary"),
        "ErrorRecord": ("error", "status"),
        "HandlerRecord": ("entry", "interpreter", "owner"),
        "HealthRecord": ("ok", "ready", "last_tick_age_s", "wire"),
        "IndexRecord": ("endpoints", "wire"),
        "OneshotRecord": (
            "sandbox",
            "durations_ms",
            "actions",
            "native",
            "platforms",
            "arches",
            "native_proof",
            "wire",
        ),
        "PlatformsRecord": ("platforms", "native", "emulated", "wire"),
        "ProbeRecord": ("ok", "at", "duration_ms", "error"),
        "ReconcileResult": ("actions", "errors", "wire"),
        "ReloadResult": ("reloaded", "changed", "needs_restart", "wire"),
        "StatusRecord": (
            "daemon",
            "arches",
            "native",
            "worker",
            "warnings",
            "native_proof",
            "wire",
        ),
        "VerifyResult": ("verified", "failed", "disabled", "wire"),
        "WorkerPlatformRecord": ("platform", "source", "proof", "reason"),
        "WorkerRecord": (
            "enabled",
            "state",
            "pid",
            "uptime_s",
            "restarts",
            "failures",
            "intended_platforms",
            "running_platforms",
            "advertised_platforms",
            "differences",
            "next_start_in_s",
            "last_error",
            "socket",
            "buildx_command",
            "binary",
            "platforms",
            "offered_platforms",
            "refused_platforms",
            "output_tail",
            "tcp_address",
            "buildx_append_command",
        ),
    },
}


def test_fields_are_only_ever_added_within_a_wire_version() -> None:
    """A renamed or removed field without a new WIRE_VERSION fails here (last stop renamed
    ArchRecord.sha256 to checksum while keeping version 1)."""
    shipped = FIELDS_OF_VERSION[wire.WIRE_VERSION]
    records = {
        c.__name__: c.__record_fields__
        for c in vars(wire).values()
        if isinstance(c, type) and issubclass(c, wire.Record) and c is not wire.Record
    }
    assert set(shipped) <= set(records), "a record was removed: new WIRE_VERSION"
    for name, fields in shipped.items():
        assert records[name][: len(fields)] == fields, f"{name}: new WIRE_VERSION"
