"""Table tests of plan.plan(): observed entries + desired state -> the actions to run."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from binfmtd import arch as archmod
from binfmtd import plan
from binfmtd.binfmt import Entry, Registration
from binfmtd.config import ConflictPolicy
from binfmtd.plan import Conflict, Desired, Observed, Register, Remove, SetEnabled

DIR = "/var/lib/binfmtd/qemu"
LEAVE, REPLACE = ConflictPolicy.LEAVE, ConflictPolicy.REPLACE


def reg(arch: str, interpreter: str | None = None, flags: str = "FPC") -> Registration:
    """What binfmtd registers for `arch`."""
    row = archmod.BY_NAME[arch]
    path = interpreter or f"{DIR}/qemu-{arch}"
    return Registration(row.entry_name, row.magic, row.mask, path, flags)


def entry(r: Registration, *, enabled: bool = True, name: str | None = None) -> Entry:
    """The entry the kernel shows after registering `r`."""
    return Entry(name or r.name, enabled, r.interpreter, r.flags, 0, r.magic, r.mask)


def foreign(arch: str, name: str | None = None, enabled: bool = True) -> Entry:
    """An entry another tool made for `arch` (interpreter outside our directory)."""
    return entry(reg(arch, f"/usr/bin/qemu-{arch}-static", "F"), enabled=enabled, name=name)


def run(
    entries: list[Entry],
    want: dict[str, bool] | None = None,
    ok: dict[str, bool] | None = None,
    policy: ConflictPolicy = LEAVE,
) -> list[plan.Action]:
    """plan() for `want` (arch -> enabled; default aarch64 enabled), interpreters intact unless
    `ok` says otherwise."""
    want = {"aarch64": True} if want is None else want
    desired = {a: Desired(a, reg(a), enabled) for a, enabled in want.items()}
    intact = {a: True for a in want} | (ok or {})
    return plan.plan(desired, Observed({e.name: e for e in entries}, intact), DIR, policy)


def kinds(actions: list[plan.Action]) -> list[str]:
    """Action type names, in order."""
    return [type(a).__name__ for a in actions]


def test_steady_state_is_a_no_op() -> None:
    """Every wanted entry present, matching, enabled, interpreter intact: nothing to do."""
    assert run([entry(reg("aarch64")), entry(reg("s390x"))], {"aarch64": True, "s390x": True}) == []


def test_missing_entry_registers() -> None:
    """A missing entry is registered with exactly the desired registration."""
    assert run([]) == [Register("aarch64", reg("aarch64"), "entry missing")]


def test_missing_entry_and_interpreter_install_first() -> None:
    """On first run the emulator is installed before the entry is registered."""
    assert kinds(run([], ok={"aarch64": False})) == ["Install", "Register"]


def test_owned_entry_disabled_by_someone_is_re_enabled() -> None:
    """An owned, matching entry someone disabled is enabled again, not re-registered."""
    actions = run([entry(reg("aarch64"), enabled=False)])
    assert actions == [SetEnabled("aarch64", "qemu-aarch64", True, "disabled by someone else")]


@pytest.mark.parametrize(
    ("observed", "why"),
    [
        (reg("aarch64", flags="F"), "flags changed to F"),
        (reg("aarch64", flags=""), "flags changed to (none)"),
        (reg("aarch64", f"{DIR}/qemu-aarch64.old"), "interpreter changed to"),
        (replace(reg("aarch64"), mask=archmod.BY_NAME["aarch64_be"].mask), "magic or mask"),
    ],
)
def test_owned_entry_that_differs_is_removed_and_registered(
    observed: Registration, why: str
) -> None:
    """An owned entry with other flags, interpreter or mask is removed, then registered anew."""
    actions = run([entry(observed)])
    assert kinds(actions) == ["Remove", "Register"]
    assert isinstance(actions[0], Remove) and actions[0].name == "qemu-aarch64"
    assert why in actions[0].reason
    assert actions[1] == Register("aarch64", reg("aarch64"), actions[0].reason)


def test_changed_interpreter_on_disk_reinstalls_and_re_registers() -> None:
    """An installed emulator that changed on disk: Install, Remove, Register (F pins the old)."""
    actions = run([entry(reg("aarch64"))], ok={"aarch64": False})
    assert kinds(actions) == ["Install", "Remove", "Register"]
    assert all(a.reason == "interpreter reinstalled" for a in actions[1:])


@pytest.mark.parametrize("intact", [True, False])
def test_foreign_entry_with_leave_is_only_a_conflict(intact: bool) -> None:
    """Under leave a foreign same-named entry yields one Conflict: no Install, Remove, Register."""
    actions = run([foreign("aarch64")], ok={"aarch64": intact})
    assert actions == [
        Conflict(
            "aarch64", "qemu-aarch64", "/usr/bin/qemu-aarch64-static", "entry made by another tool"
        )
    ]


def test_foreign_disabled_entry_with_leave_is_still_left_alone() -> None:
    """A disabled foreign entry is neither enabled nor replaced under leave."""
    assert kinds(run([foreign("aarch64", enabled=False)])) == ["Conflict"]


def test_foreign_entry_with_replace_is_removed_and_registered() -> None:
    """Under replace the foreign entry is removed and ours registered (after installing)."""
    actions = run([foreign("aarch64")], ok={"aarch64": False}, policy=REPLACE)
    assert kinds(actions) == ["Install", "Remove", "Register"]
    assert actions[1] == Remove(
        "aarch64", "qemu-aarch64", "entry made by another tool (conflict_policy: replace)"
    )
    assert actions[2] == Register("aarch64", reg("aarch64"), "replacing a foreign entry")


def test_owned_entry_no_longer_configured_is_removed() -> None:
    """An entry with our interpreter for an arch no longer selected is removed, arch None."""
    actions = run([entry(reg("aarch64")), entry(reg("s390x"))])
    assert actions == [Remove(None, "qemu-s390x", "no longer configured")]


def test_foreign_entry_not_configured_is_ignored() -> None:
    """Other tools' entries for arches we do not manage are none of our business."""
    assert run([entry(reg("aarch64")), foreign("s390x"), foreign("riscv64", name="x")]) == []


@pytest.mark.parametrize(
    ("observed", "expected"),
    [
        ([], ["Register", "SetEnabled"]),
        ([entry(reg("aarch64"))], ["SetEnabled"]),
        ([entry(reg("aarch64"), enabled=False)], []),
        ([entry(reg("aarch64", flags="F"))], ["Remove", "Register", "SetEnabled"]),
    ],
)
def test_operator_disabled_arch_is_registered_disabled(
    observed: list[Entry], expected: list[str]
) -> None:
    """An operator-disabled arch keeps a (correct) entry, disabled; a disabled one stays so."""
    actions = run(observed, {"aarch64": False})
    assert kinds(actions) == expected
    if expected:
        assert actions[-1] == SetEnabled(
            "aarch64", "qemu-aarch64", False, "disabled by the operator"
        )


@pytest.mark.parametrize(("policy", "kind"), [(LEAVE, "Conflict"), (REPLACE, "Remove")])
def test_shadowing_entry_under_another_name_is_reported(policy: ConflictPolicy, kind: str) -> None:
    """A foreign entry with another name that catches the same binaries is reported (or removed)."""
    shadow = foreign("aarch64", name="arm64-foreign")
    actions = run([entry(reg("aarch64")), shadow], policy=policy)
    assert kinds(actions) == [kind]
    assert isinstance(actions[0], Conflict | Remove) and actions[0].name == "arm64-foreign"
    assert "claims the same binaries under another name" in actions[0].reason


def test_disabled_or_non_matching_other_entries_do_not_shadow() -> None:
    """Disabled foreign entries and those for other magics are not shadows."""
    entries = [
        entry(reg("aarch64")),
        foreign("aarch64", name="off", enabled=False),
        foreign("s390x", name="zz"),
    ]
    assert run(entries) == []


# ---------------------------------------------------------------- properties

ARCHES = ["aarch64", "s390x", "riscv64", "arm"]


@st.composite
def observed_entries(draw: st.DrawFn) -> list[Entry]:
    """Any mix of owned, foreign, matching, stale, disabled entries under any names."""
    out = []
    for arch in draw(st.lists(st.sampled_from(ARCHES), max_size=6)):
        interp = draw(
            st.sampled_from([f"{DIR}/qemu-{arch}", f"{DIR}/old-{arch}", f"/usr/bin/q-{arch}"])
        )
        name = draw(st.sampled_from([f"qemu-{arch}", f"other-{arch}"]))
        flags = draw(st.sampled_from(["F", "POCF", "OC"]))
        out.append(entry(reg(arch, interp, flags), enabled=draw(st.booleans()), name=name))
    return out


@given(
    observed_entries(),
    st.dictionaries(st.sampled_from(ARCHES), st.booleans()),
    st.dictionaries(st.sampled_from(ARCHES), st.booleans()),
)
def test_leave_never_removes_or_touches_a_foreign_entry(
    entries: list[Entry], want: dict[str, bool], ok: dict[str, bool]
) -> None:
    """Under leave, no action removes, re-enables or re-registers over another tool's entry."""
    by_name = {e.name: e for e in entries}
    for action in run(entries, want, ok, LEAVE):
        name = action.reg.name if isinstance(action, Register) else getattr(action, "name", None)
        current = by_name.get(name or "")
        if current is not None and not plan.is_owned(current, DIR):
            assert isinstance(action, Conflict), action


@given(
    observed_entries(),
    st.dictionaries(st.sampled_from(ARCHES), st.booleans()),
    st.sampled_from([LEAVE, REPLACE]),
)
def test_register_only_after_its_name_is_free(
    entries: list[Entry], want: dict[str, bool], policy: ConflictPolicy
) -> None:
    """Every Register targets a name that is absent or removed earlier in the same plan."""
    present = {e.name for e in entries}
    for action in run(entries, want, None, policy):
        if isinstance(action, Remove):
            present.discard(action.name)
        if isinstance(action, Register):
            assert action.reg.name not in present, action
            present.add(action.reg.name)


def test_our_entry_clobbered_by_another_tool_is_restored_even_under_leave() -> None:
    """An entry binfmtd registered that another tool then replaced is ours: it is restored."""
    desired = {"aarch64": Desired("aarch64", reg("aarch64"), True)}
    clobbered = foreign("aarch64")
    observed = Observed({clobbered.name: clobbered}, {"aarch64": True}, frozenset({"qemu-aarch64"}))
    actions = plan.plan(desired, observed, DIR, LEAVE)
    assert kinds(actions) == ["Remove", "Register"]
    assert "clobbered by another tool" in actions[0].reason


def test_foreign_entry_never_claimed_is_still_left_alone() -> None:
    """The same foreign entry, when binfmtd never registered that name, is only reported."""
    assert kinds(run([foreign("aarch64")])) == ["Conflict"]
