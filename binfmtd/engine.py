"""One reconcile pass: observe, plan, execute, verify. Used by --oneshot and by the daemon loop.

The engine holds the in-memory truth (what is installed, what each probe said) and turns it into
per-arch status rows. Expected per-arch failures are values in those rows, never exceptions that
stop the loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from binfmtd import arch as archmod
from binfmtd import backoff, emulators, plan, probe
from binfmtd.binfmt import Entry, Registration, normalize_flags
from binfmtd.config import Config, InstallMethod, SourceKind
from binfmtd.emulators import Installed, InstallError
from binfmtd.kernel import BinfmtMisc, KernelError
from binfmtd.log import Repeats
from binfmtd.probe import ProbeResult
from binfmtd.sources import Found, Missing, Source, packages_of
from binfmtd.status import ArchStatus, derive_state

INSTALL_PARALLELISM = 4


@dataclass
class TickReport:
    """What one pass did, for the summary log line and the caller."""

    actions: list[plan.Action] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    verified: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    durations_ms: dict[str, float] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        """Whether anything was repaired or re-verified."""
        return bool(self.actions or self.verified or self.failed)


class Engine:
    """Desired state for every selected arch, kept true in one binfmt_misc instance."""

    def __init__(
        self,
        cfg: Config,
        log: Any,
        clock: Callable[[], float] = time.time,
        host_machine: str | None = None,
    ) -> None:
        self.log = log
        self.clock = clock
        self.machine = host_machine or platform.machine()
        self.kernel = BinfmtMisc(cfg.binfmt_misc)
        self.installed: dict[str, Installed] = {}
        self.file_ids: dict[str, str] = {}
        self.probes: dict[str, ProbeResult] = {}
        # The entries that could catch each arch's binaries when its probe ran: a probe proves
        # only that set (ours, or a foreign one registered later, which the kernel tries first).
        self.probed: dict[str, tuple[tuple[str, Entry], ...]] = {}
        self._entries_checked: dict[str, Entry] = {}
        self.errors: dict[str, str] = {}
        self.backoff: dict[str, backoff.Backoff] = {}  # failing installs wait before a retry
        self._absent: set[str] = set()  # arches the source lacked in the current install pass
        self.conflicts: dict[str, str] = {}
        self.claimed: set[str] = set()  # entry names this process registered in the instance
        self.entries: dict[str, Entry] = {}
        self._registrations: dict[tuple[str, str, str], Registration] = {}
        self.operator_disabled: set[str] = set()
        self.native: tuple[str, ...] = ()
        # Failures that recur every pass are logged when they start, change and end.
        self._install_failures = Repeats(log, "install_failed", "install_recovered")
        self._action_failures = Repeats(log, "action_failed", "action_recovered")
        self._probe_failures = Repeats(log, "probe_failed", "probe_recovered")
        self._untrusted = Repeats(log, "install_dir_untrusted", "install_dir_trusted", key="path")
        self.cfg = cfg
        self.apply_config(cfg)

    # ------------------------------------------------------------ configuration

    def apply_config(self, cfg: Config) -> None:
        """Adopt a (new) configuration; the next pass applies only the difference."""
        self.cfg = cfg
        self.kernel = BinfmtMisc(cfg.binfmt_misc)
        self.source = Source(cfg.source) if _source_ok(cfg) else None
        self.flags = normalize_flags(cfg.flags)
        self.installed = emulators.read_state(cfg.state_file)
        self.hashes = emulators.read_hashes(cfg.state_file)
        for directory in (cfg.install_dir, os.path.dirname(cfg.state_file)):
            with contextlib.suppress(OSError):  # left by a killed install or state write
                emulators.clean_temp_files(directory)
        # Probe roots of a process killed mid-verify; only binfmtd (holding the lock) uses them.
        shutil.rmtree(self.probe_workdir, ignore_errors=True)

    @property
    def probe_workdir(self) -> str:
        """Where probe roots are made: beside the state file, so a restart can clean them."""
        return os.path.join(os.path.dirname(self.cfg.state_file), "probe-roots")

    def detect_native(self) -> tuple[str, ...]:
        """Host-native arches: never registered. 32-bit compat is proven by running a probe."""
        always = archmod.native_arches(self.machine, compat32=False)
        compat = tuple(a for a in archmod.compat_candidates(self.machine) if self._runs_natively(a))
        self.native = always + compat
        return self.native

    def _runs_natively(self, arch: str) -> bool:
        target = archmod.BY_NAME[arch]
        snapshot = self.kernel.snapshot()
        if any(e.claims(target.magic, target.mask) for e in snapshot.entries.values()):
            return _kernel_config_has("CONFIG_IA32_EMULATION") if arch == "i386" else False
        return probe.run_probe_direct(arch, self.cfg.probe.timeout_s)

    @property
    def selected(self) -> tuple[str, ...]:
        """The arches binfmtd provisions. `all` means every catalog arch the source has (Debian
        13's QEMU 10 no longer ships cris and nios2), when the source can tell."""
        names = self.cfg.selected(self.native)
        if "all" in self.cfg.arches and self.source is not None:
            offered = self.source.offers()
            if offered is not None:
                return tuple(n for n in names if n in offered)
        return names

    def registration(self, arch: str) -> Registration:
        """The entry binfmtd wants for `arch` (made once per install_dir and flags)."""
        key = (arch, self.cfg.install_dir, self.flags)
        reg = self._registrations.get(key)
        if reg is None:
            row = archmod.BY_NAME[arch]
            path = os.path.join(self.cfg.install_dir, f"qemu-{arch}")
            reg = Registration(row.entry_name, row.magic, row.mask, path, self.flags)
            self._registrations[key] = reg
        return reg

    # ------------------------------------------------------------ one pass

    def observe(self) -> plan.Observed:
        """Read binfmt_misc and check installed interpreters (stat; hash only on change)."""
        snapshot = self.kernel.snapshot()
        self.entries = dict(snapshot.entries)
        if not self._install_dir_trusted():
            ok = dict.fromkeys(self.selected, False)
        else:
            ok = {arch: self._interpreter_intact(arch) for arch in self.selected}
        return plan.Observed(self.entries, ok, frozenset(self.claimed))

    def _install_dir_trusted(self) -> bool:
        """A directory someone else can write to taints every interpreter in it (C flag)."""
        if not os.path.isdir(self.cfg.install_dir):
            return True  # nothing installed yet; the install step creates and checks it
        try:
            emulators.check_trusted_path(self.cfg.install_dir)
        except InstallError as exc:
            self._untrusted.seen(self.cfg.install_dir, str(exc))
            return False
        self._untrusted.cleared(self.cfg.install_dir)
        return True

    def _interpreter_intact(self, arch: str) -> bool:
        record = self.installed.get(arch)
        if record is None:
            return False
        if self.source is not None and self._source_moved(arch, record):
            return False
        ident = _file_id(record.path)
        # The identity recorded at install (inode, size, mtime, ctime, mode, owner) survives a
        # restart: an unchanged file is not hashed again, so a warm start stays fast.
        if ident is not None and ident in (self.file_ids.get(arch), record.file_id):
            return True
        if emulators.sha256_of(record.path, linked_inode=_linked_inode(record)) != record.sha256:
            return False
        self.file_ids[arch] = ident or ""
        return True

    def _source_moved(self, arch: str, record: Installed) -> bool:
        assert self.source is not None
        try:
            return self.source.identity(arch) != record.source_id
        except (OSError, InstallError):
            return False  # source gone: keep what works, report it elsewhere

    def tick(
        self,
        verify_also: Iterable[str] = (),
        hold: Mapping[str, str] | None = None,
        progress: Callable[[], None] | None = None,
    ) -> TickReport:
        """Observe, plan, execute, then probe every arch that changed (and `verify_also`).

        `hold`: {arch: why} arches not to repair in this pass (reported as conflicts).
        `progress`: called when status changed in the middle of the pass: once the drift is
        observed (before any slow repair: an install, a state file write) and once the entries
        are restored (before the probes), so a publisher never shows a broken arch as verified.
        """
        report = TickReport()
        started = time.monotonic()
        self.conflicts = {}
        observed = self.observe()
        desired = {
            a: plan.Desired(a, self.registration(a), a not in self.operator_disabled)
            for a in self.selected
        }
        actions = plan.plan(desired, observed, self.cfg.install_dir, self.cfg.conflict_policy)
        actions = self._hold(actions, hold or {})
        report.durations_ms["observe"] = _ms(started)
        if actions and progress is not None:
            for action in actions:
                if action.arch is not None and not isinstance(action, plan.Conflict):
                    self.probes.pop(action.arch, None)  # about to change: unproven from now on
            self._forget_probes_of_replaced_entries()
            progress()
        touched = self.execute(actions, report)
        if actions:
            self.entries = dict(self.kernel.snapshot().entries)
        self._forget_probes_of_replaced_entries()
        stale = {a for a in self.selected if a not in self.probes and self._probe_due(a)}
        to_verify = sorted((touched | stale | set(verify_also)) & set(self.selected))
        if progress is not None and to_verify:
            progress()
        started = time.monotonic()
        self.verify(to_verify, report)
        report.durations_ms["verify"] = _ms(started)
        return report

    def _hold(self, actions: list[plan.Action], hold: Mapping[str, str]) -> list[plan.Action]:
        """Drop the repairs of held arches; say why in their status."""
        kept = []
        for action in actions:
            arch = action.arch
            if arch is not None and arch in hold and not isinstance(action, plan.Conflict):
                self.conflicts[arch] = hold[arch]
            else:
                kept.append(action)
        return kept

    def _forget_probes_of_replaced_entries(self) -> None:
        """A probe proves the entries it ran against; a replaced or added one is unproven."""
        if self.entries == self._entries_checked:
            return  # the usual idle tick: nothing changed in the instance
        self._entries_checked = dict(self.entries)
        for arch in [a for a in self.probes if a in archmod.BY_NAME]:
            if self._catchers(arch) != self.probed.get(arch):
                del self.probes[arch]

    def _catchers(self, arch: str) -> tuple[tuple[str, Entry], ...]:
        """Our entry for `arch` plus every enabled entry that would catch the same binaries."""
        row = archmod.BY_NAME[arch]
        return tuple(
            (name, entry)
            for name, entry in sorted(self.entries.items())
            if name == row.entry_name or (entry.enabled and entry.claims(row.magic, row.mask))
        )

    def _probe_due(self, arch: str) -> bool:
        entry = self.entries.get(self.registration(arch).name)
        return entry is not None and entry.enabled

    def execute(self, actions: list[plan.Action], report: TickReport) -> set[str]:
        """Run the plan; a failing arch records its error and skips its remaining steps."""
        report.actions = [a for a in actions if not isinstance(a, plan.Conflict)]
        started = time.monotonic()
        self._install([a.arch for a in actions if isinstance(a, plan.Install)], report)
        report.durations_ms["install"] = _ms(started)
        started = time.monotonic()
        touched: set[str] = set()
        with self.kernel.batch():
            for action in actions:
                arch = action.arch
                if arch is not None and arch in report.errors:
                    continue
                if not isinstance(action, plan.Install):  # installs ran as one batch above
                    self._apply(action, report)
                if arch is not None and not isinstance(action, plan.Conflict):
                    touched.add(arch)
                    self.probes.pop(arch, None)
        report.durations_ms["register"] = _ms(started)
        return touched

    def _apply(self, action: plan.Action, report: TickReport) -> None:
        try:
            if isinstance(action, plan.Register):
                self.kernel.register(action.reg)
                self.claimed.add(action.reg.name)
            elif isinstance(action, plan.Remove):
                self.kernel.remove(action.name)
                if action.arch is None:  # ours, no longer configured
                    self.claimed.discard(action.name)
            elif isinstance(action, plan.SetEnabled):
                self.kernel.set_enabled(action.name, action.enabled)
            elif isinstance(action, plan.Conflict):
                self.conflicts[action.arch] = (
                    f"entry {action.name} ({action.interpreter}) was made by another tool and is "
                    f"left alone: {action.reason}; set conflict_policy: replace to take it over"
                )
                return
        except (KernelError, OSError) as exc:
            report.errors[str(action.arch or getattr(action, "name", "?"))] = str(exc)
            if action.arch:
                self.errors[action.arch] = str(exc)
            key = str(action.arch or getattr(action, "name", "?"))
            self._action_failures.seen(key, str(exc), action=plan.describe(action))
            return
        if action.arch:
            self.errors.pop(action.arch, None)
            self._action_failures.cleared(action.arch)
        if self.log.is_enabled_for(logging.INFO):  # skip building the event when filtered
            self.log.info(
                _event(action), arch=action.arch, reason=action.reason, **_action_fields(action)
            )

    def _install(self, arches: list[str], report: TickReport) -> None:
        if not arches:
            return
        if self.source is None:
            self._fail_install(
                arches, report, f"emulator source unavailable: {self._source_problem()}"
            )
            return
        now = self.clock()
        self._absent = set()
        ids = {a: self.source.fingerprint(a) for a in arches}
        todo = [a for a in arches if backoff.due(self.backoff.get(a), now, ids[a])]
        for arch in set(arches) - set(todo):  # waiting: the last error stands, nothing is read
            report.errors[arch] = self.errors.get(arch) or self.backoff[arch].error
            self._install_failures.seen(arch, report.errors[arch])  # counted, not logged
        if todo:
            self._install_now(todo, report)
            self._record_outcomes(todo, ids, now, report)

    def _install_now(self, arches: list[str], report: TickReport) -> None:
        assert self.source is not None
        host = archmod.host_elf_machine(self.machine)
        pending = set(arches)
        try:
            self.source.check_available()
            emulators.ensure_install_dir(self.cfg.install_dir)
            self._install_streams(arches, host, report, pending)
        except (InstallError, OSError) as exc:
            self._fail_install(sorted(pending), report, str(exc))
            return
        self._add_versions([a for a in arches if a not in pending and a not in report.errors])
        self._fail_install(
            sorted(pending), report, f"source {self.source.path} has no qemu-ARCH-static"
        )
        self._save_state()

    def _record_outcomes(
        self, arches: list[str], ids: dict[str, str], now: float, report: TickReport
    ) -> None:
        """Success forgets the backoff; a failure doubles the wait (logged when the error starts
        or changes, with the wait: `retry_in_s`, None for "until the source changes")."""
        for arch in arches:
            error = report.errors.get(arch)
            if error is None:
                self.backoff.pop(arch, None)
                continue
            previous = self.backoff.get(arch)
            cfg = self.cfg.source
            # A source that lacks the arch keeps lacking it until it changes: no timed retry.
            absent = arch in self._absent
            state = backoff.failed(
                previous,
                now,
                ids[arch],
                error,
                cfg.retry_initial_s,
                cfg.retry_max_s,
                until_change=absent,
            )
            self.backoff[arch] = state
            retry = None if absent else round(state.delay_s, 1)
            self._install_failures.seen(arch, error, retry_in_s=retry)

    def _install_streams(
        self, arches: list[str], host: int | None, report: TickReport, pending: set[str]
    ) -> None:
        """A .deb is one pass over its tar; files of a directory are installed in parallel, so
        one emulator's hashing overlaps another's fsync (an all-arch install takes half as long)."""
        source = self.source
        assert source is not None
        if source.kind is SourceKind.DEB:
            for item in source.streams(arches):
                pending.discard(item.arch)
                self._install_item(item, host, report)
            return

        def one(arch: str) -> None:
            try:
                for item in source.streams([arch]):
                    pending.discard(item.arch)
                    self._install_item(item, host, report)
            except (InstallError, OSError) as exc:
                pending.discard(arch)
                self._fail_install([arch], report, str(exc))

        with ThreadPoolExecutor(min(INSTALL_PARALLELISM, len(arches))) as pool:
            list(pool.map(one, arches))

    def _install_item(self, item: Found | Missing, host: int | None, report: TickReport) -> None:
        if isinstance(item, Missing):
            self._absent.add(item.arch)
            self._fail_install([item.arch], report, item.reason)
            return
        assert self.source is not None
        arch = item.arch
        try:
            source_id = self.source.identity(arch)
            done = emulators.install_stream(
                item.stream,
                arch,
                self.cfg.install_dir,
                host,
                allow_link=self.cfg.install_method is InstallMethod.AUTO,
                hashes=self.hashes,
            )
        except (InstallError, OSError) as exc:
            self._fail_install([arch], report, str(exc))
            return
        file_id = _file_id(done.path) or ""
        self.installed[arch] = Installed(
            arch,
            done.path,
            done.sha256,
            done.version,
            self.source.describe(),
            source_id,
            self.clock(),
            file_id,
            origin=item.origin,
            package=item.package,
            package_version=item.version,
            method=done.method,
        )
        self.file_ids[arch] = file_id
        self.log.info(
            "emulator_installed",
            arch=arch,
            interpreter=done.path,
            sha256=done.sha256,
            method=done.method,
        )
        self._install_failures.cleared(arch)

    def _add_versions(self, arches: list[str]) -> None:
        """`qemu-X --version` once every write is closed: a fork while another thread holds a
        new emulator open for writing could make that emulator's exec fail with ETXTBSY.
        (Usually the version was read from the bytes while hashing: nothing runs.)
        Then the package each file came from, when the package manager knows it."""
        if not arches:
            return
        unread = [a for a in arches if self.installed[a].version is None]
        if unread:
            with ThreadPoolExecutor(min(INSTALL_PARALLELISM, len(unread))) as pool:
                paths = [self.installed[a].path for a in unread]
                versions = pool.map(emulators.qemu_version, paths)
                for arch, version in zip(unread, versions, strict=True):
                    self.installed[arch] = replace(self.installed[arch], version=version)
        unknown = [a for a in arches if self.installed[a].package is None]
        owners = packages_of(self.installed[a].origin for a in unknown)
        for arch in unknown:
            package = owners.get(self.installed[arch].origin)
            if package is not None:
                self.installed[arch] = replace(
                    self.installed[arch], package=package[0], package_version=package[1]
                )

    def _fail_install(self, arches: list[str], report: TickReport, why: str) -> None:
        for arch in arches:
            text = why.replace("ARCH", arch)
            report.errors[arch] = text
            self.errors[arch] = text

    def _source_problem(self) -> str:
        try:
            Source(self.cfg.source).check_available()
        except InstallError as exc:
            return str(exc)
        return "unknown"

    def _save_state(self) -> None:
        emulators.write_state(self.cfg.state_file, self.installed, self.flags, self.hashes)

    def verify(self, arches: Iterable[str], report: TickReport | None = None) -> None:
        """Probe `arches` in parallel and record the results."""
        names = list(arches)
        results = probe.run_probes(
            names,
            self.cfg.probe.timeout_s,
            self.cfg.probe.parallelism,
            self.clock,
            self.probe_workdir,
        )
        for arch, result in results.items():
            self.probes[arch] = result
            self.probed[arch] = self._catchers(arch)
            if report is not None:
                (report.verified if result.ok else report.failed).append(arch)
            if result.ok:
                self.log.info("probe_passed", arch=arch, duration_ms=round(result.duration_ms, 1))
                self._probe_failures.cleared(arch)
            else:
                self._probe_failures.seen(arch, result.error or "probe failed")

    def remove_own_entries(self) -> list[str]:
        """Remove every entry binfmtd owns (never others', never `status`)."""
        removed = []
        for name, entry in self.kernel.snapshot().entries.items():
            if plan.is_owned(entry, self.cfg.install_dir):
                self.kernel.remove(name)
                self.claimed.discard(name)
                removed.append(name)
        return removed

    # ------------------------------------------------------------ status

    def statuses(self) -> list[ArchStatus]:
        """A status row for every selected arch, from memory."""
        return [self.status_of(a) for a in self.selected]

    def status_of(self, arch: str) -> ArchStatus:
        """One arch's row; `verified` only when the last probe after the last change passed."""
        row = archmod.BY_NAME[arch]
        entry = self.entries.get(row.entry_name)
        record = self.installed.get(arch)
        result = self.probes.get(arch)
        owned = entry is not None and plan.is_owned(entry, self.cfg.install_dir)
        return ArchStatus(
            arch=arch,
            platforms=row.platforms,
            state=derive_state(
                arch in self.operator_disabled, entry, owned, result, self.errors.get(arch)
            ),
            registered=entry is not None,
            enabled=bool(entry and entry.enabled),
            flags=entry.flags if entry else "",
            interpreter=entry.interpreter if entry else None,
            sha256=record.sha256 if record and owned else None,
            qemu_version=record.version if record and owned else None,
            probe=result,
            error=self.errors.get(arch)
            or self.conflicts.get(arch)
            or (result.error if result and not result.ok else None),
        )

    def verified_platforms(self) -> list[str]:
        """Native platforms first, then the emulated ones whose probe passed."""
        native = archmod.platforms_of(list(self.native))
        emulated = [s.arch for s in self.statuses() if s.state.working]
        return native + [p for p in archmod.platforms_of(emulated) if p not in native]


def _source_ok(cfg: Config) -> bool:
    try:
        Source(cfg.source)
    except InstallError:
        return False
    return True


def _file_id(path: str) -> str | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_mode}:{st.st_uid}"


def _linked_inode(record: Installed) -> int | None:
    """The inode a hard-link install shares with its source (the first field of file_id)."""
    if record.method != emulators.Method.LINK:
        return None
    head = record.file_id.split(":", 1)[0]
    return int(head) if head.isdigit() else None


def _kernel_config_has(option: str) -> bool:
    path = f"/boot/config-{platform.release()}"
    try:
        with open(path, encoding="utf-8") as handle:
            return any(line.strip() == f"{option}=y" for line in handle)
    except OSError:
        return True  # x86_64 distribution kernels enable it; the probe settles it later


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


_EVENTS: dict[type, str] = {plan.Register: "entry_registered", plan.Remove: "entry_removed"}


def _event(action: plan.Action) -> str:
    if isinstance(action, plan.SetEnabled):
        return "entry_enabled" if action.enabled else "entry_disabled"
    return _EVENTS.get(type(action), "entry_changed")


def _action_fields(action: plan.Action) -> dict[str, Any]:
    if isinstance(action, plan.Register):
        return {
            "entry": action.reg.name,
            "flags": action.reg.flags,
            "interpreter": action.reg.interpreter,
        }
    return {"entry": getattr(action, "name", None)}
