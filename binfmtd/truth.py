"""One model of truth: which binfmt_misc entry, if any, the kernel uses for each arch. Pure.

An `Observation` is one frozen read of an instance: its `status` and every entry, newest first
(the order in which the kernel tries them). `handler` runs a probe's header through those
entries exactly as fs/binfmt_misc.c does; `owner_of` says whether the entry that answers is
binfmtd's (by the state file's record, never by path) or another tool's. Every state, exit
code, platform list and log line is derived from these two answers.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from binfmtd.binfmt import Entry, FormatError, Registration


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of one probe run: `at` is wall-clock seconds, `error` None when it passed."""

    arch: str
    ok: bool
    at: float
    duration_ms: float
    error: str | None = None


class Owner(StrEnum):
    """Who made the entry that handles an arch's binaries."""

    OURS = "binfmtd"
    FOREIGN = "foreign"
    NONE = "none"


@dataclass(frozen=True)
class Observation:
    """One read of a binfmt_misc instance: `enabled` is its `status` file; `entries` newest first.

    `broken` names entries that could not be parsed (name -> why); they still exist.
    """

    enabled: bool
    entries: tuple[Entry, ...]
    broken: tuple[tuple[str, str], ...] = ()
    by_name: Mapping[str, Entry] = field(init=False, repr=False, compare=False)
    # (header, filename) -> handler: an observation is frozen, so each answer is computed once
    # (status asks it for every arch several times per publish).
    _handlers: dict[tuple[bytes, str], Entry | None] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _catchers: dict[bytes, tuple[Entry, ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _shadowers: dict[str, tuple[Entry, ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    # {name: (position, (magic, mask) spread over a common length, None for extension
    # entries)}: made on the first `shadowing`, so each pair test is one integer expression.
    _ranks: dict[str, tuple[int, tuple[int, int] | None]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {e.name: e for e in self.entries})

    def get(self, name: str) -> Entry | None:
        """The entry called `name`, if present."""
        return self.by_name.get(name)

    def handler(self, header: bytes, filename: str = "probe") -> Entry | None:
        """The entry the kernel would run a file starting with `header` through, or None
        (the kernel then loads it natively, or fails with "Exec format error")."""
        if not self.enabled:
            return None
        key = (header, filename)
        try:
            return self._handlers[key]
        except KeyError:
            found = self._handlers[key] = first_handler(self.entries, header, filename)
            return found

    def catchers(self, header: bytes) -> tuple[Entry, ...]:
        """Every enabled entry whose magic/mask catch `header`, newest first (even when the
        instance as a whole is disabled: they catch again as soon as it is enabled)."""
        try:
            return self._catchers[header]
        except KeyError:
            found = self._catchers[header] = tuple(e for e in self.entries if e.handles(header))
            return found

    def shadowing(self, entry: Entry) -> tuple[Entry, ...]:
        """The enabled entries the kernel tries before `entry` that catch some of the files
        `entry` is registered for (e.g. only position-independent executables of its arch),
        newest first. One that caught `entry`'s probe would be the handler instead."""
        ranks = self._ranks or self._rank()
        at, mine = ranks.get(entry.name, (-1, None))
        if at < 0 or (self.entries[at] is not entry and self.entries[at] != entry):
            return ()  # not an entry of this observation
        try:
            return self._shadowers[entry.name]
        except KeyError:
            found: tuple[Entry, ...] = ()
            if mine is not None:
                magic, mask = mine
                found = tuple(
                    e
                    for e in self.entries[:at]
                    if e.enabled
                    and (theirs := ranks[e.name][1]) is not None
                    and (magic ^ theirs[0]) & mask & theirs[1] == 0
                )
            self._shadowers[entry.name] = found
            return found

    def _rank(self) -> dict[str, tuple[int, tuple[int, int] | None]]:
        """Fill `_ranks`: every magic entry spread to one length (`Entry.spread`), so that two
        catch some file in common when (magic1 ^ magic2) & mask1 & mask2 == 0; extension
        entries (which depend on a file's name, not its bytes) have None."""
        magic = [e for e in self.entries if e.magic and e.extension is None]
        end = max((e.offset + len(e.magic) for e in magic), default=0)
        spreads = {e.name: e.spread(end) for e in magic}
        self._ranks.update({e.name: (i, spreads.get(e.name)) for i, e in enumerate(self.entries)})
        return self._ranks


EMPTY = Observation(False, ())


def first_handler(entries: tuple[Entry, ...], header: bytes, filename: str) -> Entry | None:
    """The first enabled entry, in the kernel's order, that handles `header`."""
    for entry in entries:
        if entry.handles(header, filename):
            return entry
    return None


def is_ours(entry: Entry, owned: Mapping[str, Registration]) -> bool:
    """An entry is binfmtd's when the record names it and it is still what was registered."""
    recorded = owned.get(entry.name)
    return recorded is not None and entry.matches(recorded)


def owner_of(entry: Entry | None, owned: Mapping[str, Registration]) -> Owner:
    """OURS, FOREIGN or NONE (no entry)."""
    if entry is None:
        return Owner.NONE
    return Owner.OURS if is_ours(entry, owned) else Owner.FOREIGN


def adopt(obs: Observation, interpreters: Mapping[str, Collection[str]]) -> dict[str, Registration]:
    """Ownership for a state file written before the record existed (migration).

    `interpreters` maps arch -> the exact paths binfmtd put that arch's emulator at (what the
    old state file recorded, and the configured `install_dir/qemu-<arch>`). An entry
    `qemu-<arch>` running exactly one of them is binfmtd's; nothing is judged by prefix.
    """
    owned: dict[str, Registration] = {}
    for arch, paths in interpreters.items():
        entry = obs.get(f"qemu-{arch}")
        if entry is None or entry.interpreter not in paths:
            continue
        try:
            owned[entry.name] = entry.registration()
        except FormatError:
            continue
    return owned


def catches_self(reg: Registration, headers: tuple[bytes, ...]) -> bool:
    """Whether registering `reg` would route any of `headers` (binfmtd's own executable, the
    running Python) through it: that entry would break the host's own programs."""
    probe = Entry(reg.name, True, reg.interpreter, reg.flags, 0, reg.magic, reg.mask)
    return any(probe.handles(h, "") for h in headers if h)
