"""Desired state + observed state -> actions. Every reconcile decision lives here. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from binfmtd.binfmt import Entry, Registration
from binfmtd.config import ConflictPolicy


@dataclass(frozen=True)
class Install:
    """(Re)install the emulator for `arch` from the source."""

    arch: str
    reason: str


@dataclass(frozen=True)
class Register:
    """Register `reg` (the entry is absent when this runs)."""

    arch: str
    reg: Registration
    reason: str


@dataclass(frozen=True)
class Remove:
    """Remove entry `name`."""

    arch: str | None
    name: str
    reason: str


@dataclass(frozen=True)
class SetEnabled:
    """Enable or disable entry `name`."""

    arch: str
    name: str
    enabled: bool
    reason: str


@dataclass(frozen=True)
class Conflict:
    """A foreign entry we leave alone by policy; reported, never silently skipped."""

    arch: str
    name: str
    interpreter: str
    reason: str


Action = Install | Register | Remove | SetEnabled | Conflict


@dataclass(frozen=True)
class Desired:
    """What binfmtd wants for one arch."""

    arch: str
    reg: Registration
    enabled: bool = True


@dataclass(frozen=True)
class Observed:
    """What the tick saw: entries by name, and which installed interpreters are intact.

    `claimed` names the entries this binfmtd registered in this instance: when another tool
    later puts its own entry under such a name, that is a clobbered entry of ours to restore,
    not a pre-existing foreign one to leave alone.
    """

    entries: Mapping[str, Entry]
    interpreter_ok: Mapping[str, bool]
    claimed: frozenset[str] = frozenset()


def is_owned(entry: Entry, install_dir: str) -> bool:
    """Entries whose interpreter lives in our install directory are ours."""
    return entry.interpreter.startswith(install_dir.rstrip("/") + "/")


def plan(
    desired: Mapping[str, Desired],
    observed: Observed,
    install_dir: str,
    policy: ConflictPolicy,
) -> list[Action]:
    """The actions that bring `observed` to `desired`, in the order to run them."""
    actions: list[Action] = []
    wanted_names = {d.reg.name for d in desired.values()}
    for name, entry in sorted(observed.entries.items()):
        if name not in wanted_names and is_owned(entry, install_dir):
            actions.append(Remove(None, name, "no longer configured"))
    for _arch, want in sorted(desired.items()):
        actions.extend(_plan_arch(want, observed, install_dir, policy))
    return actions


def _plan_arch(
    want: Desired, observed: Observed, install_dir: str, policy: ConflictPolicy
) -> list[Action]:
    arch, reg = want.arch, want.reg
    out: list[Action] = []
    shadows = _shadowing(want, observed.entries, install_dir)
    for other in shadows:
        out.append(_foreign(arch, other, policy, "claims the same binaries under another name"))
    entry = observed.entries.get(reg.name)
    if entry is not None and reg.name in observed.claimed and not is_owned(entry, install_dir):
        why = f"clobbered by another tool (interpreter {entry.interpreter})"
        reinstall = not observed.interpreter_ok.get(arch, False)
        steps: list[Action] = [Install(arch, "interpreter missing or changed on disk")]
        return [
            *out,
            *(steps if reinstall else []),
            Remove(arch, reg.name, why),
            Register(arch, reg, why),
            *_disable_after(want, reg),
        ]
    if entry is not None and not is_owned(entry, install_dir) and policy is ConflictPolicy.LEAVE:
        # Nothing will be registered for this arch, so nothing is installed for it either.
        return [*out, _foreign(arch, entry, policy, "entry made by another tool")]
    reinstall = not observed.interpreter_ok.get(arch, False)
    if reinstall:
        out.append(Install(arch, "interpreter missing or changed on disk"))
    if entry is None:
        return [*out, Register(arch, reg, "entry missing"), *_disable_after(want, reg)]
    if not is_owned(entry, install_dir):
        out.append(_foreign(arch, entry, policy, "entry made by another tool"))
        return [*out, Register(arch, reg, "replacing a foreign entry"), *_disable_after(want, reg)]
    if reinstall or not entry.matches(reg):
        why = "interpreter reinstalled" if reinstall else _difference(entry, reg)
        out += [Remove(arch, reg.name, why), Register(arch, reg, why)]
        return out + _disable_after(want, reg)
    if entry.enabled != want.enabled:
        why = "disabled by someone else" if want.enabled else "disabled by the operator"
        out.append(SetEnabled(arch, reg.name, want.enabled, why))
    return out


def _disable_after(want: Desired, reg: Registration) -> list[Action]:
    if want.enabled:
        return []
    return [SetEnabled(want.arch, reg.name, False, "disabled by the operator")]


def _foreign(arch: str, entry: Entry, policy: ConflictPolicy, why: str) -> Action:
    if policy is ConflictPolicy.LEAVE:
        return Conflict(arch, entry.name, entry.interpreter, why)
    return Remove(arch, entry.name, f"{why} (conflict_policy: replace)")


def _shadowing(want: Desired, entries: Mapping[str, Entry], install_dir: str) -> list[Entry]:
    """Other-named enabled entries that would catch this arch's binaries."""
    return [
        e
        for name, e in sorted(entries.items())
        if name != want.reg.name
        and e.enabled
        and not is_owned(e, install_dir)
        and e.claims(want.reg.magic, want.reg.mask)
    ]


def _difference(entry: Entry, reg: Registration) -> str:
    if entry.interpreter != reg.interpreter:
        return f"interpreter changed to {entry.interpreter}"
    if entry.flags != reg.flags:
        return f"flags changed to {entry.flags or '(none)'}"
    return "magic or mask changed"


def describe(action: Action) -> str:
    """A short human label such as "register qemu-aarch64"."""
    name = getattr(action, "name", None) or getattr(action, "reg", None) or action.arch
    label = name.name if isinstance(name, Registration) else name
    return f"{type(action).__name__.lower()} {label}"
