"""Table tests of the planning layer: one observation + desired state -> the actions to run,
and which arches are due for a probe. No daemon, no kernel: frozen values in, values out."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from binfmtd import arch as archmod
from binfmtd import plan
from binfmtd.binfmt import Entry, Registration
from binfmtd.plan import (
    Conflict,
    Desired,
    Disown,
    Refuse,
    Register,
    Remove,
    Schedule,
    SetEnabled,
    World,
)
from binfmtd.status import Proof
from binfmtd.truth import Observation, ProbeResult

DIR = "/var/lib/binfmtd/qemu"


def reg(arch: str, interpreter: str | None = None, flags: str = "FPC") -> Registration:
    """What binfmtd registers for `arch`."""
    row = archmod.BY_NAME[arch]
    path = interpreter or f"{DIR}/qemu-{arch}"
    return Registration(row.entry_name, row.magic, row.mask, path, flags)


def entry(r: Registration, *, enabled: bool = True, name: str | None = None) -> Entry:
    """The entry the kernel shows after registering `r`."""
    return Entry(name or r.name, enabled, r.interpreter, r.flags, 0, r.magic, r.mask)


def foreign(arch: str, name: str | None = None, enabled: bool = True) -> Entry:
    """An entry another tool made for `arch`."""
    return entry(reg(arch, f"/usr/bin/qemu-{arch}-static", "F"), enabled=enabled, name=name)


def header(arch: str) -> bytes:
    """A header of `arch` (its masked magic is a valid start of such a file)."""
    return archmod.BY_NAME[arch].magic


def run(
    entries: list[Entry],
    want: dict[str, bool] | None = None,
    ok: dict[str, bool] | None = None,
    replace_policy: bool = False,
    owned: list[Registration] | None = None,
    native: tuple[str, ...] = (),
    self_headers: tuple[bytes, ...] = (),
    instance: bool = True,
) -> list[plan.Action]:
    """plan() for `want` (arch -> enabled; default aarch64). `entries` newest first; `owned`
    defaults to every entry named qemu-X that is exactly our registration."""
    want = {"aarch64": True} if want is None else want
    desired = {a: Desired(a, reg(a), enabled) for a, enabled in want.items()}
    intact = {a: True for a in want} | (ok or {})
    if owned is None:
        mine = [reg(a) for a in archmod.BY_NAME]
        owned = [r for r in mine if any(e.matches(r) and e.name == r.name for e in entries)]
    headers = {a: header(a) for a in [*want, *native]}
    world = World(
        Observation(instance, tuple(entries)),
        {r.name: r for r in owned},
        intact,
        headers,
        self_headers,
        native,
    )
    return plan.plan(desired, world, replace_policy)


def kinds(actions: list[plan.Action]) -> list[str]:
    """Action type names, in order."""
    return [type(a).__name__ for a in actions]


# ---------------------------------------------------------------- our own entries


def test_steady_state_is_a_no_op() -> None:
    """Every wanted entry present, ours, matching, enabled, interpreter intact: nothing to do."""
    assert run([entry(reg("aarch64")), entry(reg("s390x"))], {"aarch64": True, "s390x": True}) == []


def test_missing_entry_registers() -> None:
    """A missing entry is registered with exactly the desired registration."""
    assert run([]) == [Register("aarch64", reg("aarch64"), "entry missing")]


def test_missing_entry_and_interpreter_install_first() -> None:
    """On first run the emulator is installed before the entry is registered."""
    assert kinds(run([], ok={"aarch64": False})) == ["Install", "Register"]


@pytest.mark.parametrize(
    ("by_operator", "why"),
    [(False, "disabled by someone else"), (True, "enabled by the operator")],
)
def test_our_disabled_entry_is_enabled_with_the_true_reason(by_operator: bool, why: str) -> None:
    """Re-enabling says who asked: a repair of someone else's disable, or the operator's enable."""
    desired = {"aarch64": Desired("aarch64", reg("aarch64"), True, by_operator)}
    off = entry(reg("aarch64"), enabled=False)
    world = World(
        Observation(True, (off,)),
        {"qemu-aarch64": reg("aarch64")},
        {"aarch64": True},
        {"aarch64": header("aarch64")},
    )
    assert plan.plan(desired, world, False) == [SetEnabled("aarch64", "qemu-aarch64", True, why)]


@pytest.mark.parametrize(
    ("observed", "why"),
    [
        (reg("aarch64", flags="F"), "flags changed to F"),
        (reg("aarch64", flags=""), "flags changed to (none)"),
        (reg("aarch64", f"{DIR}/qemu-aarch64.old"), "interpreter changed to"),
        (replace(reg("aarch64"), mask=archmod.BY_NAME["aarch64_be"].mask), "magic or mask"),
    ],
)
def test_our_entry_that_differs_from_the_configuration_is_registered_anew(
    observed: Registration, why: str
) -> None:
    """An entry we recorded (registered under an older configuration) is removed, registered."""
    actions = run([entry(observed)], owned=[observed])
    assert kinds(actions) == ["Remove", "Register"]
    assert isinstance(actions[0], Remove) and why in actions[0].reason


def test_changed_interpreter_on_disk_reinstalls_and_re_registers() -> None:
    """An installed emulator that changed on disk: Install, Remove, Register (F pins the old)."""
    actions = run([entry(reg("aarch64"))], ok={"aarch64": False})
    assert kinds(actions) == ["Install", "Remove", "Register"]
    assert all(a.reason == "interpreter reinstalled" for a in actions[1:])


def test_our_entry_no_longer_configured_is_removed_and_a_gone_one_disowned() -> None:
    """Recorded entries of arches no longer wanted: removed if still ours, else disowned."""
    gone = reg("riscv64")
    actions = run(
        [entry(reg("aarch64")), entry(reg("s390x"))], owned=[reg("aarch64"), reg("s390x"), gone]
    )
    assert actions == [
        Disown("qemu-riscv64", "gone"),
        Remove(None, "qemu-s390x", "no longer configured"),
    ]


def test_ownership_is_by_record_not_by_path() -> None:
    """An entry of another tool under our install_dir is foreign; ours under an old path is ours."""
    theirs = entry(reg("s390x", f"{DIR}/their-s390x"), name="other-s390x")
    assert run([entry(reg("aarch64")), theirs]) == []  # never "no longer configured"
    old = reg("aarch64", "/opt/old-dir/qemu-aarch64")
    assert kinds(run([entry(old)], owned=[old])) == ["Remove", "Register"]


def test_our_entry_clobbered_by_another_tool_is_restored_even_under_leave() -> None:
    """A name binfmtd registered that another tool then took over is restored."""
    actions = run([foreign("aarch64")], owned=[reg("aarch64")])
    assert kinds(actions) == ["Remove", "Register"]
    assert "clobbered by another tool" in actions[0].reason


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
    owned = [
        Registration("qemu-aarch64", e.magic, e.mask, e.interpreter, e.flags) for e in observed
    ]
    actions = run(observed, {"aarch64": False}, owned=owned)
    assert kinds(actions) == expected
    if expected:
        assert actions[-1] == SetEnabled(
            "aarch64", "qemu-aarch64", False, "disabled by the operator"
        )


# ---------------------------------------------------------------- other tools' entries


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
    actions = run([foreign("aarch64")], ok={"aarch64": False}, replace_policy=True)
    assert kinds(actions) == ["Remove", "Install", "Register"]
    assert actions[0] == Remove(
        "aarch64", "qemu-aarch64", "entry made by another tool (conflict_policy: replace)"
    )


@pytest.mark.parametrize("name", ["aarch64-linux", "x86_64", "binfmt-support-arm64"])
def test_foreign_handler_under_any_name_blocks_our_registration_under_leave(name: str) -> None:
    """NixOS's aarch64-linux (or any name): under leave no competing entry is registered."""
    actions = run([foreign("aarch64", name=name)])
    assert actions == [
        Conflict(
            "aarch64",
            name,
            "/usr/bin/qemu-aarch64-static",
            "handles aarch64 binaries under another name",
        )
    ]


def test_our_entry_newer_than_a_foreign_handler_is_removed_under_leave() -> None:
    """Ours registered after the foreign one takes its binaries: removed (leave: never compete)."""
    actions = run([entry(reg("aarch64")), foreign("aarch64", name="aarch64-linux")])
    assert kinds(actions) == ["Conflict", "Remove"]
    assert actions[1] == Remove(
        "aarch64",
        "qemu-aarch64",
        "would take aarch64 binaries from aarch64-linux of another tool (leave)",
    )


def test_our_entry_shadowed_by_a_newer_foreign_one_stays_under_leave() -> None:
    """A foreign entry added after ours wins in the kernel; ours stays, the conflict is reported."""
    assert kinds(run([foreign("aarch64", name="aarch64-linux"), entry(reg("aarch64"))])) == [
        "Conflict"
    ]


def test_foreign_handler_under_another_name_is_removed_under_replace() -> None:
    """Under replace, any other-named entry catching the arch is removed; ours stays."""
    actions = run(
        [foreign("aarch64", name="aarch64-linux"), entry(reg("aarch64"))], replace_policy=True
    )
    assert actions == [
        Remove(
            "aarch64",
            "aarch64-linux",
            "handles aarch64 binaries under another name (conflict_policy: replace)",
        )
    ]


def test_disabled_or_non_matching_other_entries_are_no_rivals() -> None:
    """Disabled foreign entries and those for other magics do not block or shadow."""
    entries = [
        entry(reg("aarch64")),
        foreign("aarch64", name="off", enabled=False),
        foreign("s390x", name="zz"),
    ]
    assert run(entries) == []


# ---------------------------------------------------------------- the host's own formats


@pytest.mark.parametrize(
    ("replace_policy", "mine", "kind"),
    [(False, False, "Conflict"), (True, False, "Remove"), (False, True, "Remove")],
)
def test_entry_catching_a_native_format(replace_policy: bool, mine: bool, kind: str) -> None:
    """A qemu-i386 catching the host's own i386 programs: ours always removed; another tool's
    removed under replace, reported under leave."""
    catcher = entry(reg("i386")) if mine else foreign("i386")
    actions = run([catcher], {}, native=("x86_64", "i386"), replace_policy=replace_policy)
    assert kinds(actions) == [kind]
    assert "catches this host's own i386 programs" in actions[0].reason


def test_never_registers_an_entry_that_catches_binfmtd_itself() -> None:
    """uname -m lied (or the table is wrong): an entry catching our own executable is refused."""
    own = archmod.BY_NAME["x86_64"].magic + bytes(40)
    actions = run([], {"x86_64": True}, self_headers=(own,))
    assert kinds(actions) == ["Refuse"]
    assert isinstance(actions[0], Refuse)
    assert "would catch binfmtd's own executable" in actions[0].reason


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ([], []),
        ([foreign("i386")], None),
        ([entry(reg("i386"))], ["qemu-i386"]),
    ],
)
def test_clear_for_native_probe(entries: list[Entry], expected: list[str] | None) -> None:
    """Native by proof needs no catcher: ours is removed first; a foreign one (leave) stops it."""
    owned = {r.name: r for r in [reg("i386")]}
    got = plan.clear_for_native_probe(
        "i386", Observation(True, tuple(entries)), owned, header("i386"), False
    )
    assert (None if got is None else [a.name for a in got if isinstance(a, Remove)]) == expected


# ---------------------------------------------------------------- when to probe

SCHEDULE = Schedule(reverify_s=600, retry_s=30)
OURS = entry(reg("aarch64"))
PASSED = ProbeResult("aarch64", True, 1000.0, 5.0)
FAILED = ProbeResult("aarch64", False, 1000.0, 5.0, "probe exited 1")


@pytest.mark.parametrize(
    ("handler", "proof", "now", "due"),
    [
        (None, None, 1000.0, False),
        (OURS, None, 1000.0, True),
        (OURS, Proof(PASSED, OURS), 1005.0, False),
        (OURS, Proof(PASSED, foreign("aarch64")), 1005.0, True),
        (foreign("aarch64", name="x"), Proof(PASSED, OURS), 1005.0, True),
        (OURS, Proof(PASSED, OURS), 1600.0, True),
        (OURS, Proof(FAILED, OURS), 1005.0, False),
        (OURS, Proof(FAILED, OURS), 1030.0, True),
        (OURS, Proof(PASSED, OURS), 1000.0 - 3600, True),
        (OURS, Proof(PASSED, OURS), 1000.0 + 86400, True),
    ],
)
def test_due_probes(handler: Entry | None, proof: Proof | None, now: float, due: bool) -> None:
    """A proof counts only for its handler; it expires; a clock step back re-verifies at once."""
    proofs = {} if proof is None else {"aarch64": proof}
    assert plan.due_probes({"aarch64": handler}, proofs, now, SCHEDULE) == (
        ("aarch64",) if due else ()
    )


# ---------------------------------------------------------------- properties

ARCHES = ["aarch64", "s390x", "riscv64", "arm"]


@st.composite
def observed_entries(draw: st.DrawFn) -> list[Entry]:
    """Any mix of ours, foreign, matching, stale, disabled entries under any names."""
    out: dict[str, Entry] = {}
    for arch in draw(st.lists(st.sampled_from(ARCHES), max_size=6)):
        interp = draw(
            st.sampled_from([f"{DIR}/qemu-{arch}", f"{DIR}/old-{arch}", f"/usr/bin/q-{arch}"])
        )
        name = draw(st.sampled_from([f"qemu-{arch}", f"other-{arch}"]))
        flags = draw(st.sampled_from(["F", "POCF", "OC"]))
        out[name] = entry(reg(arch, interp, flags), enabled=draw(st.booleans()), name=name)
    return list(out.values())


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
    for action in run(entries, want, ok, False, owned=[]):
        name = action.reg.name if isinstance(action, Register) else getattr(action, "name", None)
        if name in by_name:
            assert isinstance(action, Conflict), action


@given(
    observed_entries(),
    st.dictionaries(st.sampled_from(ARCHES), st.booleans()),
    st.booleans(),
)
def test_register_only_after_its_name_is_free(
    entries: list[Entry], want: dict[str, bool], replace_policy: bool
) -> None:
    """Every Register targets a name that is absent or removed earlier in the same plan."""
    present = {e.name for e in entries}
    for action in run(entries, want, None, replace_policy):
        if isinstance(action, Remove):
            present.discard(action.name)
        if isinstance(action, Register):
            assert action.reg.name not in present, action
            present.add(action.reg.name)
