"""What status says about one arch, derived from what the engine knows. Pure.

The states form a closed set; only `VERIFIED` (ours) and `FOREIGN_VERIFIED` (another tool's
entry, left alone, whose probe passed) count as working, and both need a probe that ran against
the entry as it is now.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from binfmtd.binfmt import Entry
from binfmtd.probe import ProbeResult


class ArchState(StrEnum):
    """One arch's state in status, from best to worst."""

    VERIFIED = "verified"
    FOREIGN_VERIFIED = "foreign-verified"
    UNVERIFIED = "unverified"
    FAILED = "failed"
    DISABLED = "disabled"
    MISSING = "missing"
    ERROR = "error"

    @property
    def working(self) -> bool:
        """Whether this arch may be advertised: a probe proved the current entry."""
        return self in {ArchState.VERIFIED, ArchState.FOREIGN_VERIFIED}


def derive_state(
    disabled: bool, entry: Entry | None, owned: bool, result: ProbeResult | None, error: str | None
) -> ArchState:
    """Fail closed: working only when the entry exists, is enabled and its probe passed."""
    if disabled:
        return ArchState.DISABLED
    if entry is None:
        return ArchState.ERROR if error else ArchState.MISSING
    if not entry.enabled:
        return ArchState.DISABLED
    if result is None:
        return ArchState.UNVERIFIED
    if not result.ok:
        return ArchState.FAILED
    return ArchState.VERIFIED if owned else ArchState.FOREIGN_VERIFIED


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
    sha256: str | None
    qemu_version: str | None
    probe: ProbeResult | None
    error: str | None
