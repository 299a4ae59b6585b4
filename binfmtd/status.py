"""What status says about one arch, derived from one observation of the instance. Pure.

The states form a closed set. Only `VERIFIED` counts as working: binfmtd's own entry is the one
the kernel picks for the arch's binaries, and a probe that ran against exactly that entry passed.
Only `VERIFIED` and `OPERATOR_DISABLED` are fine for `check` and `--oneshot`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from binfmtd.binfmt import Entry, Registration
from binfmtd.truth import Observation, Owner, ProbeResult, is_ours, owner_of


class ArchState(StrEnum):
    """One arch's state in status."""

    VERIFIED = "verified"
    UNVERIFIED = "unverified"
    FAILED = "failed"
    OPERATOR_DISABLED = "operator-disabled"
    DISABLED = "disabled"  # binfmtd's entry, disabled by someone else: enabled again next pass
    FOREIGN = "foreign"
    FOREIGN_DISABLED = "foreign-disabled"
    SHADOWED_BY_FOREIGN = "shadowed-by-foreign"
    INSTANCE_DISABLED = "instance-disabled"
    NATIVE_SHADOWED = "native-shadowed"
    MISSING = "missing"
    ERROR = "error"

    @property
    def working(self) -> bool:
        """Whether this arch may be advertised: our entry handles it and its probe passed."""
        return self is ArchState.VERIFIED

    @property
    def fine(self) -> bool:
        """Whether `check` and `--oneshot` accept it: working, or disabled by the operator."""
        return self in {ArchState.VERIFIED, ArchState.OPERATOR_DISABLED}


@dataclass(frozen=True)
class Proof:
    """A probe result and the entry it ran through (None: no entry, the kernel loaded it)."""

    result: ProbeResult
    handler: Entry | None


@dataclass(frozen=True)
class Facts:
    """Everything one arch's state depends on, taken from one pass."""

    arch: str
    obs: Observation
    header: bytes
    name: str
    owned: Mapping[str, Registration]
    operator_disabled: bool = False
    proof: Proof | None = None
    error: str | None = None
    root: str = "/proc/sys/fs/binfmt_misc"
    native: bool = False
    # The first bytes of binfmtd's installed emulator (a program of this host): an entry that
    # catches them runs the emulator itself through another interpreter ("" when unknown).
    interpreter_header: bytes = b""


@dataclass(frozen=True)
class Verdict:
    """An arch's state, the entry that handles its binaries (if any) and one line on why."""

    state: ArchState
    handler: Entry | None
    owner: Owner
    detail: str | None


def derive(f: Facts) -> Verdict | None:
    """The verdict for one arch; None for a native arch nothing catches (nothing to show)."""
    if f.native:
        return _native(f)
    if not f.obs.enabled:
        why = (
            f"binfmt_misc is disabled as a whole ({f.root}/status says disabled), so no entry "
            f"runs: enable it with `echo 1 > {f.root}/status`"
        )
        return Verdict(ArchState.INSTANCE_DISABLED, None, Owner.NONE, why)
    handler = f.obs.handler(f.header)
    owner = owner_of(handler, f.owned)
    if handler is None:
        return _unhandled(f)
    if owner is Owner.FOREIGN:
        return _foreign(f, handler)
    blocker = f.obs.handler(f.interpreter_header) if f.interpreter_header else None
    if blocker is not None:
        return Verdict(ArchState.FAILED, handler, owner, f.error or _blocked(f, handler, blocker))
    shadows = [e for e in f.obs.shadowing(handler) if not is_ours(e, f.owned)]
    if shadows:
        return Verdict(
            ArchState.SHADOWED_BY_FOREIGN, handler, owner, f.error or _part(f, shadows[0])
        )
    proof = f.proof if f.proof is not None and f.proof.handler == handler else None
    if proof is None:
        return Verdict(ArchState.UNVERIFIED, handler, owner, f.error)
    if proof.result.ok:
        return Verdict(ArchState.VERIFIED, handler, owner, f.error)
    return Verdict(ArchState.FAILED, handler, owner, f.error or proof.result.error)


def _native(f: Facts) -> Verdict | None:
    catchers = f.obs.catchers(f.header)
    if not catchers:
        return None
    first = catchers[0]
    who = "binfmtd's own" if is_ours(first, f.owned) else "another tool's"
    why = (
        f"entry {first.name} ({first.interpreter}, {who}) catches this host's own {f.arch} "
        f"programs, which then run through it or fail: remove it with "
        f"`echo -1 > {f.root}/{first.name}`, or set conflict_policy: replace"
    )
    return Verdict(ArchState.NATIVE_SHADOWED, first, owner_of(first, f.owned), f.error or why)


def _unhandled(f: Facts) -> Verdict:
    ours = f.obs.get(f.name)
    if f.operator_disabled:
        return Verdict(ArchState.OPERATOR_DISABLED, None, Owner.NONE, None)
    if ours is not None and not is_ours(ours, f.owned) and not ours.enabled:
        why = (
            f"entry {ours.name} ({ours.interpreter}) was made by another tool and is disabled, "
            f"so {f.arch} binaries fail with 'Exec format error'; it is left alone "
            f"(conflict_policy: leave): enable it with `echo 1 > {f.root}/{ours.name}`, "
            "or set conflict_policy: replace"
        )
        return Verdict(ArchState.FOREIGN_DISABLED, None, Owner.NONE, f.error or why)
    if f.error:
        return Verdict(ArchState.ERROR, None, Owner.NONE, f.error)
    if ours is not None and not ours.enabled:
        why = f"entry {ours.name} was disabled by someone else; binfmtd enables it again"
        return Verdict(ArchState.DISABLED, None, Owner.NONE, why)
    why = f"no enabled entry handles {f.arch} binaries"
    return Verdict(ArchState.MISSING, None, Owner.NONE, why)


def _blocked(f: Facts, handler: Entry, blocker: Entry) -> str:
    """Why binfmtd's emulator cannot run: `blocker` catches the emulator file itself."""
    who = "binfmtd's own" if is_ours(blocker, f.owned) else "another tool's"
    return (
        f"entry {blocker.name} ({blocker.interpreter}, {who}) catches binfmtd's emulator "
        f"{handler.interpreter} itself (a program of this host), so {f.arch} binaries run "
        f"through it or fail, whatever an earlier probe showed: remove it with "
        f"`echo -1 > {f.root}/{blocker.name}`"
    )


def _part(f: Facts, other: Entry) -> str:
    """Why `other`, another tool's entry tried before binfmtd's, keeps the arch from working."""
    return (
        f"entry {other.name} ({other.interpreter}) was made by another tool and is left alone, "
        f"but the kernel tries it before binfmtd's {f.name} and it catches part of the "
        f"{f.arch} binaries (magic {other.magic.hex()}, mask {other.mask.hex()}; e.g. only "
        f"position-independent ones), which run through {other.interpreter} instead: remove "
        f"it with `echo -1 > {f.root}/{other.name}`, or set conflict_policy: replace"
    )


def _foreign(f: Facts, handler: Entry) -> Verdict:
    note = ""
    if f.proof is not None and f.proof.handler == handler:
        result = f.proof.result
        note = " (its probe passed)" if result.ok else f" (its probe failed: {result.error})"
    fix = (
        f"remove it with `echo -1 > {f.root}/{handler.name}`, or set conflict_policy: replace "
        f"to let binfmtd manage {f.arch}"
    )
    ours = f.obs.get(f.name)
    if ours is not None and ours.enabled and is_ours(ours, f.owned):
        why = (
            f"entry {handler.name} ({handler.interpreter}) was made by another tool and is left "
            f"alone, but it catches {f.arch} binaries before binfmtd's {f.name}{note}: {fix}"
        )
        return Verdict(ArchState.SHADOWED_BY_FOREIGN, handler, Owner.FOREIGN, f.error or why)
    why = (
        f"entry {handler.name} ({handler.interpreter}) was made by another tool and is left "
        f"alone; it handles {f.arch} binaries{note}: {fix}"
    )
    return Verdict(ArchState.FOREIGN, handler, Owner.FOREIGN, f.error or why)


@dataclass(frozen=True)
class ArchStatus:
    """What status shows for one arch (sent as `wire.ArchRecord`, built by `views`)."""

    arch: str
    platforms: tuple[str, ...]
    state: ArchState
    registered: bool
    enabled: bool
    flags: str
    interpreter: str | None
    checksum: str | None
    qemu_version: str | None
    probe: ProbeResult | None
    error: str | None
    handler: Entry | None = None
    owner: Owner = Owner.NONE
