"""Desired state + one observation -> actions; and when to probe what. Pure.

Every reconcile decision lives here: which entries to register, remove, enable or disable,
which other tools' entries to report, what binfmtd refuses to register, and which arches are
due for a probe. The engine only executes the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from binfmtd.binfmt import Entry, Registration
from binfmtd.status import Proof
from binfmtd.truth import Observation, catches_self, is_ours


@dataclass(frozen=True)
class Install:
    """(Re)install the emulator for `arch` from the source."""

    arch: str
    reason: str


@dataclass(frozen=True)
class Register:
    """Register `reg` (the entry is absent when this runs); it becomes binfmtd's by record."""

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
    """Another tool's entry left alone by policy; reported, never silently skipped."""

    arch: str
    name: str
    interpreter: str
    reason: str


@dataclass(frozen=True)
class Refuse:
    """An entry binfmtd will not register, and why (it would catch the host's own programs)."""

    arch: str
    name: str
    reason: str


@dataclass(frozen=True)
class Disown:
    """Drop `name` from the ownership record: it is gone, or another tool's entry took it."""

    name: str
    reason: str


Action = Install | Register | Remove | SetEnabled | Conflict | Refuse | Disown


@dataclass(frozen=True)
class Desired:
    """What binfmtd wants for one arch. `by_operator`: the operator changed `enabled` just now."""

    arch: str
    reg: Registration
    enabled: bool = True
    by_operator: bool = False


@dataclass(frozen=True)
class World:
    """The inputs of one pass besides the configuration, all frozen.

    `owned`: the ownership record (entry name -> what binfmtd registered). `intact`: arch ->
    whether its installed interpreter is the recorded file. `headers`: arch -> the first bytes
    of its probe. `self_headers`: the starts of binfmtd's own executables. `native`: the arches
    this host runs itself.
    """

    obs: Observation
    owned: Mapping[str, Registration]
    intact: Mapping[str, bool]
    headers: Mapping[str, bytes]
    self_headers: tuple[bytes, ...] = ()
    native: tuple[str, ...] = ()


def plan(desired: Mapping[str, Desired], world: World, replace: bool) -> list[Action]:
    """The actions that bring the instance to `desired`, in the order to run them.

    `replace` is conflict_policy: replace (other tools' entries in the way are removed).
    """
    actions: list[Action] = []
    for arch in world.native:
        actions += _native(arch, world, replace)
    removed = {a.name for a in actions if isinstance(a, Remove)}
    actions += [a for a in _unwanted(desired, world) if a.name not in removed]
    for _arch, want in sorted(desired.items()):
        actions += plan_arch(want, world, replace)
    return actions


def _unwanted(desired: Mapping[str, Desired], world: World) -> list[Remove | Disown]:
    wanted = {d.reg.name for d in desired.values()}
    out: list[Remove | Disown] = []
    for name in sorted(set(world.owned) - wanted):
        entry = world.obs.get(name)
        if entry is not None and is_ours(entry, world.owned):
            out.append(Remove(None, name, "no longer configured"))
        else:
            out.append(Disown(name, "gone" if entry is None else "taken over by another tool"))
    return out


def _native(arch: str, world: World, replace: bool) -> list[Action]:
    """Entries that catch a host-native format break the host's own programs."""
    out: list[Action] = []
    why = f"catches this host's own {arch} programs"
    header = world.headers.get(arch)
    for entry in world.obs.catchers(header) if header else ():
        if is_ours(entry, world.owned):
            out.append(Remove(arch, entry.name, why))
        elif replace:
            out.append(Remove(arch, entry.name, f"{why} (conflict_policy: replace)"))
        else:
            out.append(Conflict(arch, entry.name, entry.interpreter, why))
    return out


def clear_for_native_probe(
    arch: str, obs: Observation, owned: Mapping[str, Registration], header: bytes, replace: bool
) -> list[Action] | None:
    """The removals that let `arch`'s probe run with no entry catching it (native by proof);
    None when another tool's entry catches it and conflict_policy: leave protects it."""
    catchers = obs.catchers(header)
    if not replace and any(not is_ours(e, owned) for e in catchers):
        return None
    why = f"catches {arch} programs: proving whether this host runs them itself"
    return [Remove(arch, e.name, why) for e in catchers]


def plan_arch(want: Desired, world: World, replace: bool) -> list[Action]:
    """The actions for one arch alone (its rivals included, nothing else's)."""
    arch, reg = want.arch, want.reg
    if catches_self(reg, world.self_headers):
        why = (
            f"its magic/mask would catch binfmtd's own executable: every program of this host "
            f"would run through qemu-{arch}; {arch} looks native here"
        )
        return [Refuse(arch, reg.name, why)]
    header = world.headers.get(arch, reg.magic)
    entry = world.obs.get(reg.name)
    ours = entry is not None and is_ours(entry, world.owned)
    rivals = [
        e for e in world.obs.catchers(header) if e.name != reg.name and not is_ours(e, world.owned)
    ]
    out: list[Action] = []
    for other in rivals:
        if replace:
            out.append(Remove(arch, other.name, _rival_why(arch, "conflict_policy: replace")))
        else:
            out.append(Conflict(arch, other.name, other.interpreter, _rival_why(arch, "")))
    if rivals and not replace:
        return out + _yield_to(want, world, rivals[0], ours)
    if ours and entry is not None:
        out += _partial(arch, world, entry, replace, {r.name for r in rivals})
    if entry is not None and not ours:
        if reg.name not in world.owned and not replace:
            return [
                *out,
                Conflict(arch, entry.name, entry.interpreter, "entry made by another tool"),
            ]
        why = (
            f"clobbered by another tool (interpreter {entry.interpreter})"
            if reg.name in world.owned
            else "entry made by another tool (conflict_policy: replace)"
        )
        out.append(Remove(arch, reg.name, why))
        return out + _install_if(want, world) + _register(want, why)
    install = _install_if(want, world)
    if entry is None:
        return out + install + _register(want, "entry missing")
    if install or not entry.matches(reg):
        why = "interpreter reinstalled" if install else _difference(entry, reg)
        return [*out, *install, Remove(arch, reg.name, why), *_register(want, why)]
    if entry.enabled != want.enabled:
        out.append(SetEnabled(arch, reg.name, want.enabled, _enable_why(want)))
    return out


def _partial(
    arch: str, world: World, entry: Entry, replace: bool, rivals: set[str]
) -> list[Action]:
    """Other tools' entries tried before binfmtd's `entry` that catch part of its binaries
    (not the probe; `rivals` catch it and are dealt with already): removed under replace,
    else left alone as a conflict."""
    why = f"catches part of the {arch} binaries before binfmtd's {entry.name}"
    others = [
        e
        for e in world.obs.shadowing(entry)
        if e.name not in rivals and not is_ours(e, world.owned)
    ]
    if replace:
        return [Remove(arch, e.name, f"{why} (conflict_policy: replace)") for e in others]
    return [Conflict(arch, e.name, e.interpreter, why) for e in others]


def _rival_why(arch: str, policy: str) -> str:
    text = f"handles {arch} binaries under another name"
    return f"{text} ({policy})" if policy else text


def _yield_to(want: Desired, world: World, rival: Entry, ours: bool) -> list[Action]:
    """Under leave binfmtd never competes with another tool's handler: an enabled entry of ours
    that the kernel would try before it is removed; one tried after it may stay (shadowed)."""
    names = [e.name for e in world.obs.entries]
    entry = world.obs.get(want.reg.name)
    if not ours or entry is None or not entry.enabled:
        return []
    if names.index(entry.name) > names.index(rival.name):
        return []
    why = f"would take {want.arch} binaries from {rival.name} of another tool (leave)"
    return [Remove(want.arch, entry.name, why)]


def _install_if(want: Desired, world: World) -> list[Action]:
    if world.intact.get(want.arch, False):
        return []
    return [Install(want.arch, "interpreter missing or changed on disk")]


def _register(want: Desired, why: str) -> list[Action]:
    steps: list[Action] = [Register(want.arch, want.reg, why)]
    if not want.enabled:
        steps.append(SetEnabled(want.arch, want.reg.name, False, "disabled by the operator"))
    return steps


def _enable_why(want: Desired) -> str:
    if not want.enabled:
        return "disabled by the operator"
    return "enabled by the operator" if want.by_operator else "disabled by someone else"


def _difference(entry: Entry, reg: Registration) -> str:
    if entry.interpreter != reg.interpreter:
        return f"interpreter changed to {entry.interpreter}"
    if entry.flags != reg.flags:
        return f"flags changed to {entry.flags or '(none)'}"
    return "magic or mask changed"


def key(action: Action) -> str:
    """What names `action` in a pass's errors: its arch, else the entry it acts on."""
    return str(getattr(action, "arch", None) or getattr(action, "name", "?"))


def describe(action: Action) -> str:
    """A short human label such as "register qemu-aarch64"."""
    if isinstance(action, Register):
        return f"register {action.reg.name}"
    if isinstance(action, Install):
        return f"install {action.arch}"
    return f"{type(action).__name__.lower()} {action.name}"


# ---------------------------------------------------------------- when to probe


@dataclass(frozen=True)
class Schedule:
    """Probe timing: re-verify a proof after `reverify_s`, a failed one after `retry_s` at the
    latest (both wall-clock seconds)."""

    reverify_s: float
    retry_s: float


def next_probe_at(proofs: Mapping[str, Proof], now: float, schedule: Schedule) -> float | None:
    """When the earliest of `proofs` falls due after `now` (wall-clock seconds), or None."""
    times = [proof.result.at + _limit(proof, schedule) for proof in proofs.values()]
    return min([t for t in times if t > now], default=None)


def _limit(proof: Proof, schedule: Schedule) -> float:
    """How long `proof` stands (seconds): a failed one is retried sooner."""
    if proof.result.ok:
        return schedule.reverify_s
    return min(schedule.reverify_s, schedule.retry_s)


def due_probes(
    handlers: Mapping[str, Entry | None],
    proofs: Mapping[str, Proof],
    now: float,
    schedule: Schedule,
) -> tuple[str, ...]:
    """The arches to probe now: `handlers` maps each arch to the enabled entry the kernel would
    use (arches with none are not probed). A proof counts only for the handler it ran through;
    a negative age (wall clock stepped back) re-verifies at once rather than waiting it out."""
    due = []
    for arch, handler in sorted(handlers.items()):
        if handler is None:
            continue
        proof = proofs.get(arch)
        if proof is None or proof.handler != handler:
            due.append(arch)
            continue
        age = now - proof.result.at
        if age < 0 or age >= _limit(proof, schedule):
            due.append(arch)
    return tuple(due)
