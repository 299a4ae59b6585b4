"""Status derivation from one observation: which entry handles each arch, whose it is, and the
state that says so. Fails closed: only our own handler with a probe through it is working."""

from __future__ import annotations

import pytest

from binfmtd import arch as archmod
from binfmtd.binfmt import Entry, Registration
from binfmtd.status import ArchState, Facts, Proof, derive
from binfmtd.truth import Observation, Owner, ProbeResult, adopt

ROW = archmod.BY_NAME["aarch64"]
OUR_REG = Registration(
    "qemu-aarch64", ROW.magic, ROW.mask, "/var/lib/binfmtd/qemu/qemu-aarch64", "POCF"
)
HEADER = ROW.magic + bytes(64)


def entry(name: str = "qemu-aarch64", *, enabled: bool = True, interp: str | None = None) -> Entry:
    """An aarch64-catching entry (ours unless `interp` says otherwise)."""
    return Entry(name, enabled, interp or OUR_REG.interpreter, "POCF", 0, ROW.magic, ROW.mask)


OURS, OURS_OFF = entry(), entry(enabled=False)
DEBIAN = entry(interp="/usr/bin/qemu-aarch64-static")
DEBIAN_OFF = entry(enabled=False, interp="/usr/bin/qemu-aarch64-static")
NIX = entry("aarch64-linux", interp="/nix/store/q/bin/qemu-aarch64")
PASSED = ProbeResult("aarch64", True, 1.0, 5.0)
FAILED = ProbeResult("aarch64", False, 1.0, 5.0, "exec format error")


def facts(entries: tuple[Entry, ...], *, instance: bool = True, **kw: object) -> Facts:
    """Facts for aarch64 with our registration on record."""
    obs = Observation(instance, entries)
    return Facts("aarch64", obs, HEADER, "qemu-aarch64", {"qemu-aarch64": OUR_REG}, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("entries", "kw", "state", "owner"),
    [
        ((OURS,), {"proof": Proof(PASSED, OURS)}, ArchState.VERIFIED, Owner.OURS),
        ((OURS,), {"proof": Proof(FAILED, OURS)}, ArchState.FAILED, Owner.OURS),
        ((OURS,), {}, ArchState.UNVERIFIED, Owner.OURS),
        ((OURS,), {"proof": Proof(PASSED, DEBIAN)}, ArchState.UNVERIFIED, Owner.OURS),
        ((OURS_OFF,), {"operator_disabled": True}, ArchState.OPERATOR_DISABLED, Owner.NONE),
        ((OURS_OFF,), {}, ArchState.DISABLED, Owner.NONE),
        ((DEBIAN_OFF,), {}, ArchState.FOREIGN_DISABLED, Owner.NONE),
        ((DEBIAN,), {"proof": Proof(PASSED, DEBIAN)}, ArchState.FOREIGN, Owner.FOREIGN),
        ((DEBIAN,), {"operator_disabled": True}, ArchState.FOREIGN, Owner.FOREIGN),
        ((NIX, OURS), {"proof": Proof(PASSED, OURS)}, ArchState.SHADOWED_BY_FOREIGN, Owner.FOREIGN),
        ((OURS, NIX), {"proof": Proof(PASSED, OURS)}, ArchState.VERIFIED, Owner.OURS),
        ((), {}, ArchState.MISSING, Owner.NONE),
        ((), {"error": "install failed"}, ArchState.ERROR, Owner.NONE),
    ],
)
def test_derive(
    entries: tuple[Entry, ...], kw: dict[str, object], state: ArchState, owner: Owner
) -> None:
    """Each observation (entries newest first) maps to exactly one state and handler owner."""
    verdict = derive(facts(entries, **kw))  # type: ignore[arg-type]
    assert verdict is not None
    assert (verdict.state, verdict.owner) == (state, owner)


def test_instance_disabled_is_its_own_state_with_the_fix() -> None:
    """echo 0 > status: no entry runs; the state says so and how to undo it."""
    verdict = derive(facts((OURS,), instance=False, proof=Proof(PASSED, OURS)))
    assert verdict is not None and verdict.state is ArchState.INSTANCE_DISABLED
    assert "echo 1 > /proc/sys/fs/binfmt_misc/status" in (verdict.detail or "")


def test_shadowing_entry_is_named_with_what_to_do() -> None:
    """The detail names the entry in the way, its interpreter, and the fix."""
    verdict = derive(facts((NIX, OURS)))
    assert verdict is not None
    assert "entry aarch64-linux (/nix/store/q/bin/qemu-aarch64)" in (verdict.detail or "")
    assert "echo -1 > /proc/sys/fs/binfmt_misc/aarch64-linux" in (verdict.detail or "")


@pytest.mark.parametrize(("entries", "shadowed"), [((), False), ((DEBIAN,), True)])
def test_native_arch_is_shown_only_when_something_catches_it(
    entries: tuple[Entry, ...], shadowed: bool
) -> None:
    """A native arch gets a row only when an entry catches its programs: native-shadowed."""
    verdict = derive(facts(entries, native=True))
    assert (verdict is not None) == shadowed
    if verdict is not None:
        assert verdict.state is ArchState.NATIVE_SHADOWED
        assert "catches this host's own aarch64 programs" in (verdict.detail or "")


def test_only_verified_is_working_and_only_operator_disable_is_also_fine() -> None:
    """What platforms advertise and what check/oneshot accept."""
    assert {s for s in ArchState if s.working} == {ArchState.VERIFIED}
    assert {s for s in ArchState if s.fine} == {ArchState.VERIFIED, ArchState.OPERATOR_DISABLED}


def test_adopt_takes_only_entries_running_exactly_the_recorded_emulators() -> None:
    """Migration from a state file without the record: exact interpreter path, never a prefix."""
    other = entry("qemu-s390x", interp="/var/lib/binfmtd/qemu/qemu-s390x-theirs")
    obs = Observation(True, (OURS, other))
    paths = {"aarch64": {OUR_REG.interpreter}, "s390x": {"/var/lib/binfmtd/qemu/qemu-s390x"}}
    assert set(adopt(obs, paths)) == {"qemu-aarch64"}
    assert OURS.matches(adopt(obs, paths)["qemu-aarch64"])
