"""Status derivation fails closed: only a probe that passed against the current entry counts."""

from __future__ import annotations

import pytest

from binfmtd.binfmt import Entry
from binfmtd.probe import ProbeResult
from binfmtd.status import ArchState, derive_state

ON = Entry("qemu-aarch64", True, "/var/lib/binfmtd/qemu/qemu-aarch64", "POCF")
OFF = Entry("qemu-aarch64", False, "/var/lib/binfmtd/qemu/qemu-aarch64", "POCF")
PASSED = ProbeResult("aarch64", True, 1.0, 5.0)
FAILED = ProbeResult("aarch64", False, 1.0, 5.0, "exec format error")


@pytest.mark.parametrize(
    ("disabled", "entry", "owned", "result", "error", "state"),
    [
        (False, ON, True, PASSED, None, ArchState.VERIFIED),
        (False, ON, False, PASSED, None, ArchState.FOREIGN_VERIFIED),
        (False, ON, True, FAILED, None, ArchState.FAILED),
        (False, ON, True, None, None, ArchState.UNVERIFIED),
        (False, OFF, True, PASSED, None, ArchState.DISABLED),
        (True, ON, True, PASSED, None, ArchState.DISABLED),
        (False, None, True, PASSED, None, ArchState.MISSING),
        (False, None, True, None, "install failed", ArchState.ERROR),
    ],
)
def test_derive_state(
    disabled: bool,
    entry: Entry | None,
    owned: bool,
    result: ProbeResult | None,
    error: str | None,
    state: ArchState,
) -> None:
    """Each combination of entry, ownership, probe and error maps to exactly one state."""
    assert derive_state(disabled, entry, owned, result, error) is state


def test_only_verified_states_are_working() -> None:
    """Only a passed probe makes an arch advertisable; disabled, missing and failed never do."""
    assert {s for s in ArchState if s.working} == {
        ArchState.VERIFIED,
        ArchState.FOREIGN_VERIFIED,
    }
