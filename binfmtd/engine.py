"""One reconcile pass: observe, plan, execute, verify. Used by --oneshot and by the daemon loop.

The engine executes what `plan` decides and keeps the few facts a pass cannot read back from the
kernel: what is installed, which entries binfmtd registered (the ownership record, kept in the
state file) and what each probe proved, for which handler. Every status row is derived from the
observation of the last pass (`status.derive`). Expected per-arch failures are values in those
rows, never exceptions that stop the loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from binfmtd import arch as archmod
from binfmtd import backoff, emulators, installs, origin, plan, probe, truth
from binfmtd.binfmt import Entry, FormatError, Registration, normalize_flags, parse_register_string
from binfmtd.config import Config, ConflictPolicy, InstallMethod
from binfmtd.emulators import Installed, InstallError
from binfmtd.installs import SOURCE_ERRORS
from binfmtd.installs import source_error as _source_error
from binfmtd.kernel import BinfmtMisc, KernelError
from binfmtd.log import Repeats
from binfmtd.sources import PackageOwners, Source, packages_of, packages_soon
from binfmtd.status import ArchState, ArchStatus, Facts, Proof, derive
from binfmtd.truth import Observation, Owner

RETRY_FAILED_S = 30.0
PROGRESS_EVERY_S = 0.04  # while probes run, status is published at most this often


@dataclass
class TickReport:
    """What one pass did, for the summary log line and the caller."""

    actions: list[plan.Action] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    verified: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    durations_ms: dict[str, float] = field(default_factory=dict)
    # Arches binfmtd wrote to binfmt_misc for (an entry registered, removed, enabled or
    # disabled), even when a later step of the same arch failed: what a fight is counted by.
    written: set[str] = field(default_factory=set)

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
        packages: PackageOwners | None = None,
    ) -> None:
        """`packages`: the package lookup `headstart.begin` started for this configuration,
        taken over by the first pass that installs."""
        self.log = log
        self.clock = clock
        self.machine = host_machine or os.uname().machine
        self.self_headers = _self_headers()
        self.order = archmod.order_of_header(self.self_headers[0] if self.self_headers else b"")
        self.kernel = BinfmtMisc(cfg.binfmt_misc)
        self.installed: dict[str, Installed] = {}
        self.owned: dict[str, Registration] = {}
        self._owned_before: dict[str, Registration] = {}  # the record as this pass's plan saw it
        self._adopt = False
        self._state_dirty = False
        self.file_ids: dict[str, str] = {}
        self.proofs: dict[str, Proof] = {}
        self.errors: dict[str, str] = {}
        self._said: dict[str, str] = {}
        self._said_now: set[str] = set()
        self.backoff: dict[str, backoff.Backoff] = {}  # failing installs wait before a retry
        self._absent: set[str] = set()  # arches the source lacked in the current install pass
        self.operator_disabled: set[str] = set()
        self.operator_changed: set[str] = set()
        self.native: tuple[str, ...] = ()
        self.native_proof: dict[str, str] = {}
        self.observation: Observation = truth.EMPTY
        self._selection: tuple[Config, tuple[str, ...], tuple[str, ...]] | None = None
        self._rows: list[ArchStatus] | None = None  # statuses() of the publish under way
        self._registrations: dict[tuple[str, str, str], Registration] = {}
        self._headers: dict[str, bytes] = {}
        self._interpreter_headers: dict[str, tuple[tuple[str, str | None], bytes]] = {}
        # Where boot-time tools keep their entries (read to say where a foreign one comes from).
        self.origin_roots = origin.Roots()
        self._origins: origin.Index | None = None
        # Failures that recur every pass are logged when they start, change and end.
        self._install_failures = Repeats(log, "install_failed", "install_recovered")
        self._action_failures = Repeats(log, "action_failed", "action_recovered")
        self._probe_failures = Repeats(log, "probe_failed", "probe_recovered")
        self._untrusted = Repeats(log, "install_dir_untrusted", "install_dir_trusted", key="path")
        self.cfg = cfg
        self._probe_stage: probe.Stage | None = None  # made on the first probe, kept
        self._early_owners = packages
        self.apply_config(cfg)
        # What the operator switched off stays off across a restart (the state file's record;
        # a reload keeps the running set, whatever the new state_file holds).
        recorded = emulators.read_operator_disabled(cfg.state_file)
        self.operator_disabled = {a for a in recorded if a in archmod.BY_NAME}

    # ------------------------------------------------------------ configuration

    def apply_config(self, cfg: Config) -> None:
        """Adopt a (new) configuration; the next pass applies only the difference."""
        self.cfg = cfg
        self.kernel = BinfmtMisc(cfg.binfmt_misc)
        self.source = Source(cfg.source) if _source_ok(cfg) else None
        self.flags = normalize_flags(cfg.flags)
        self.installed = emulators.read_state(cfg.state_file)
        self.hashes = emulators.read_hashes(cfg.state_file)
        self.owned, self._adopt = _read_owned(cfg.state_file)
        for directory in (cfg.install_dir, os.path.dirname(cfg.state_file)):
            with contextlib.suppress(OSError):  # left by a killed install or state write
                emulators.clean_temp_files(directory)
        # Probe roots of a process killed mid-verify; only binfmtd (holding the lock) uses them.
        self.close()
        shutil.rmtree(self.probe_workdir, ignore_errors=True)

    def close(self) -> None:
        """Stop the probe runner and remove the probe stage (made again when next needed)."""
        if self._probe_stage is not None:
            self._probe_stage.close()
            self._probe_stage = None

    @property
    def probe_workdir(self) -> str:
        """Where probe roots are made: beside the state file, so a restart can clean them."""
        return os.path.join(os.path.dirname(self.cfg.state_file), "probe-roots")

    @property
    def replace(self) -> bool:
        """conflict_policy: replace."""
        return self.cfg.conflict_policy is ConflictPolicy.REPLACE

    def header(self, arch: str) -> bytes:
        """The start of `arch`'s probe (read once), or its catalog magic without a probe."""
        found = self._headers.get(arch)
        if found is None:
            found = probe.header(arch) or archmod.BY_NAME[arch].magic
            self._headers[arch] = found
        return found

    def detect_native(self) -> tuple[str, ...]:
        """Host-native arches, never registered: the running binary's own format and `uname -m`
        (byte order from the running binary); each 32-bit compat candidate only by proof."""
        always, compat = archmod.host_arches(self.machine, self.order)
        own = [a for h in self.self_headers for a in archmod.arches_of_header(h)]
        native = list(dict.fromkeys([*always, *own]))
        self.native_proof = dict.fromkeys(native, "this host's own format")
        obs = self.observe()
        for arch in compat:
            if arch not in native and self._prove_native(arch, obs):
                native.append(arch)
        self.native = tuple(native)
        return self.native

    def _prove_native(self, arch: str, obs: Observation) -> bool:
        """Run `arch`'s probe directly with no entry catching it; SIGSYS counts as native."""
        removals = plan.clear_for_native_probe(
            arch, obs, self.owned, self.header(arch), self.replace
        )
        if removals is None:  # another tool's entry catches it and leave forbids touching it
            catcher = obs.catchers(self.header(arch))[0]
            self.native_proof[arch] = f"not proven: entry {catcher.name} catches it first"
            return True  # reported as native-shadowed: it catches the host's 32-bit programs
        for action in removals:
            self._apply(action, plan.key(action), TickReport(), info=True)
        found, why = probe.run_probe_direct(arch, self.cfg.probe.timeout_s)
        self.native_proof[arch] = why
        if found is probe.Native.SECCOMP:
            self.log.warning(
                "native_probe_seccomp_killed",
                arch=arch,
                detail="the kernel runs it natively; a seccomp filter on binfmtd killed the probe",
            )
        return found is not probe.Native.NO

    def host_elf_machine(self) -> int | None:
        """The e_machine emulators must carry: the running binary's own, else by `uname -m`."""
        own = [a for h in self.self_headers[:1] for a in archmod.arches_of_header(h)]
        if own:
            return archmod.BY_NAME[own[0]].machine
        return archmod.host_elf_machine(self.machine, self.order)

    @property
    def selected(self) -> tuple[str, ...]:
        """The arches binfmtd provisions. `all` means every catalog arch the source has (Debian
        13's QEMU 10 no longer ships cris and nios2), when the source can tell.

        Worked out once per pass (and after a new configuration or native set): status asks for
        it many times per publish, and asking the source means a stat of its directory."""
        known = self._selection
        if known is None or known[0] is not self.cfg or known[1] != self.native:
            known = self._selection = (self.cfg, self.native, self._select())
        return known[2]

    def _select(self) -> tuple[str, ...]:
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

    def observe(self) -> Observation:
        """One frozen read of the instance: its status and every entry, newest first."""
        snap = self.kernel.snapshot()
        return Observation(snap.enabled, tuple(snap.entries.values()), tuple(snap.broken.items()))

    def world(self, obs: Observation) -> plan.World:
        """Everything `plan.plan` needs besides the desired state, for observation `obs`."""
        if self._adopt:  # a state file from before the ownership record: migrate it
            self.owned.update(truth.adopt(obs, self._adoptable()))
            self._adopt, self._state_dirty = False, True
        if not self._install_dir_trusted():
            intact = dict.fromkeys(self.selected, False)
        else:
            intact = self._intact(self.selected)
        headers = {a: self.header(a) for a in (*self.selected, *self.native)}
        return plan.World(obs, dict(self.owned), intact, headers, self.self_headers, self.native)

    def _adoptable(self) -> dict[str, set[str]]:
        """Per arch, the exact interpreter paths that were binfmtd's before the record existed."""
        paths = {a: {self.registration(a).interpreter} for a in self.selected}
        for arch, record in self.installed.items():
            paths.setdefault(arch, set()).add(record.path)
        return paths

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

    def _intact(self, arches: Iterable[str]) -> dict[str, bool]:
        """Per arch, whether its installed emulator is still the recorded one: by the file's
        identity, else by its checksum. Files to hash are hashed several at once (BLAKE3
        releases the GIL): a link made to a hard-linked source moves every one's ctime."""
        found = {arch: self._intact_by_identity(arch) for arch in arches}
        todo = [arch for arch, ok in found.items() if ok is None]
        workers = min(len(todo), installs.workers())
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                hashed = dict(zip(todo, pool.map(self._hash_matches, todo), strict=True))
        else:
            hashed = {arch: self._hash_matches(arch) for arch in todo}
        for arch, ident in hashed.items():
            found[arch] = ident is not None
            if ident:
                self._proven_identity(arch, ident)
        return {arch: bool(ok) for arch, ok in found.items()}

    def _intact_by_identity(self, arch: str) -> bool | None:
        """True or False when the record and the file's identity decide; None: hash it."""
        record = self.installed.get(arch)
        if record is not None and self.source is not None and self._source_moved(arch, record):
            return False
        return self._installed_by_identity(arch)

    def _still_installed(self, arch: str) -> bool:
        """Whether the installed emulator is the recorded one (identity, else checksum), as
        made, whatever the source says now."""
        found = self._installed_by_identity(arch)
        return found if found is not None else self._hash_matches(arch) is not None

    def _installed_by_identity(self, arch: str) -> bool | None:
        """Like `_intact_by_identity`, without asking the source."""
        record = self.installed.get(arch)
        if record is None or record.path != self.registration(arch).interpreter:
            return False  # never installed, or install_dir moved since
        ident = emulators.file_id(record.path)
        if ident is not None and not emulators.installed_as_made(ident):
            return False  # chmod'ed (setuid, writable) or chown'ed: installed again, as made
        # The identity recorded at install (inode, size, mtime, ctime, mode, owner) survives a
        # restart: an unchanged file is not hashed again, so a warm start stays fast.
        if ident is not None and ident in (self.file_ids.get(arch), record.file_id):
            return True
        return None

    def _hash_matches(self, arch: str) -> str | None:
        """The file's identity ("" when unknown) if its bytes have the recorded checksum, else
        None (any thread: it changes nothing)."""
        record = self.installed[arch]
        ident = emulators.file_id(record.path)
        if not emulators.matches(record.path, record.checksum, linked_inode=_linked_inode(record)):
            return None
        return ident or ""

    def _proven_identity(self, arch: str, ident: str) -> None:
        """The bytes under `ident` were proven again: no hash for it until it moves."""
        record = self.installed[arch]
        self.file_ids[arch] = ident
        if _same_inode(ident, record):
            # Only metadata moved (a link to a hard-linked source made or removed, a chmod):
            # record it, or every later start hashes the file again.
            self.installed[arch] = replace(record, file_id=ident)
            self._state_dirty = True

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
        changed: Callable[[], bool] | None = None,
    ) -> TickReport:
        """Observe, plan, execute, then probe every arch whose handler is unproven or due
        (and `verify_also`). Status is derived from this pass's last observation.

        Each registered arch's probe starts as soon as its entry is written (pipelined with
        the rest of the batch and the state file write), on `probe.workers_for` threads.

        `hold`: {arch: why} arches not to repair in this pass (why becomes their error).
        `progress`: called when status changed in the middle of the pass, so a publisher never
        shows a broken arch as verified: first as soon as an observation differs from the last
        one (an entry gone or changed: before planning), again when the plan drops a proof
        that still showed (a deleted emulator, before its reinstall), then as probes finish
        (at most every PROGRESS_EVERY_S; the caller publishes the end of the pass).
        `changed`: whether something watched changed since the pass began (the watcher); asked
        as each probe result comes in and every probe.IDLE_EVERY_S while none does, a yes is
        looked at at once (`_recheck`): a drift while probes run (a hanging one may take its
        whole timeout) does not wait for the end of the pass to show.
        """
        report = TickReport()
        started = time.monotonic()
        self._origins = None
        self._selection = None  # what the source offers is read again once per pass
        obs = self.observe()
        if progress is not None and obs != self.observation:
            self._show(obs, progress)  # the stale window ends here, before anything slow
        actions = self._plan(obs, hold or {}, report)
        report.durations_ms["observe"] = _ms(started)
        if progress is not None and self._unprove(actions, obs):
            self._show(obs, progress)  # what is broken shows as such before the slow repairs
        prober = self._prober()
        prober.prepare(self._likely_probes(actions, obs, verify_also))
        idents = self.execute(actions, report, prober)
        self._early_owners = None  # the lookup begun at start serves the first pass only
        if report.actions:
            obs = self.observe()
            for arch in {getattr(a, "arch", None) for a in report.actions} - set(report.errors):
                self.proofs.pop(str(arch), None)  # what binfmtd just changed is proven anew
        self._log_instance_change(obs)
        self.observation = obs
        if progress is not None and report.actions and not prober.started:
            progress()  # restored, nothing to probe: shown before the state file write
        if not self._state_dirty and (self.owned or self.installed):
            # Deleted under the daemon (no event watches it): written again, or a restart
            # would take binfmtd's own entries for another tool's and hash everything anew.
            self._state_dirty = not os.path.lexists(self.cfg.state_file)
        self._save_state_if_needed(report)  # runs while the first probes do
        started = time.monotonic()
        self._verify(prober, self._due(obs, verify_also), idents, report, progress, changed)
        report.durations_ms["verify"] = _ms(started)
        self._settle_errors(report)
        return report

    def _plan(
        self, obs: Observation, hold: Mapping[str, str], report: TickReport
    ) -> list[plan.Action]:
        desired = {
            a: plan.Desired(
                a,
                self.registration(a),
                a not in self.operator_disabled,
                a in self.operator_changed,
            )
            for a in self.selected
        }
        actions = _hold(plan.plan(desired, self.world(obs), self.replace), hold, report)
        if self.operator_changed:
            self._state_dirty = True  # the operator's choice is recorded for a restart
        self.operator_changed.clear()
        return actions

    def _show(self, obs: Observation, progress: Callable[[], None]) -> None:
        """Make `obs` the observation status is derived from, and publish it."""
        self._log_instance_change(obs)
        self.observation = obs
        progress()

    def _unprove(self, actions: list[plan.Action], obs: Observation) -> bool:
        """Drop the proofs of arches about to change (reinstall, re-register): unproven from
        now on. True when one of them still showed as verified in `obs`."""
        shown = False
        # Only the source moved (an upgrade, or a broken source in backoff): the entry runs the
        # proven installed file until a new one is in place, so its proof stands until then
        # (`tick` drops it once the reinstall succeeded); a failing retry changes nothing.
        pending = {
            a.arch
            for a in actions
            if isinstance(a, plan.Install)
            and a.arch in self.proofs
            and self._still_installed(a.arch)
        }
        for action in actions:
            arch = getattr(action, "arch", None)
            if arch is None or arch in pending or isinstance(action, _JUDGEMENTS):
                continue  # a Remove of another entry, a conflict left alone: no arch changes
            proof = self.proofs.pop(arch, None)
            if proof is not None and proof.handler == obs.handler(self.header(arch)):
                shown = True
        return shown

    def _prober(self) -> probe.Prober:
        """A pass's prober, on the probe stage (and runner) this engine keeps between passes."""
        parallelism, workdir = self.cfg.probe.parallelism, self.probe_workdir
        stage = self._probe_stage
        if stage is None or (stage.workdir, stage.workers) != (
            workdir,
            probe.workers_for(parallelism),
        ):
            self.close()
            stage = self._probe_stage = probe.Stage(parallelism, workdir, self._stage_warning)
        return probe.Prober(stage, self.cfg.probe.timeout_s, self.clock)

    def start_probe_runner(self) -> None:
        """Put every selected arch's probe in the stage and boot the probe runner now (about
        25 ms in a process of its own), so the first pass's probes do not wait for it."""
        self._prober().prepare(self.selected)

    def _stage_warning(self, why: str) -> None:
        self.log.warning("probe_stage_remade", error=why)

    def _likely_probes(
        self, actions: list[plan.Action], obs: Observation, verify_also: Iterable[str]
    ) -> list[str]:
        """The arches this pass will probe, as far as known before it acts: what it registers
        and what is due now. Their roots are made before any probe starts."""
        registers = [a.arch for a in actions if isinstance(a, plan.Register)]
        return list(dict.fromkeys([*registers, *self._due(obs, verify_also)]))

    def _log_instance_change(self, obs: Observation) -> None:
        was = self.observation
        if obs.enabled == (True if was is truth.EMPTY else was.enabled):
            return
        root = self.kernel.root
        if obs.enabled:
            self.log.info("binfmt_misc_enabled", path=str(root))
        else:
            self.log.error(
                "binfmt_misc_disabled",
                path=str(root),
                error=f"{root}/status says disabled: no entry runs; `echo 1 > {root}/status`",
            )

    def _due(self, obs: Observation, verify_also: Iterable[str]) -> list[str]:
        handlers = {a: obs.handler(self.header(a)) for a in self.selected}
        schedule = plan.Schedule(self.cfg.reverify_interval_s, RETRY_FAILED_S)
        due = set(plan.due_probes(handlers, self.proofs, self.clock(), schedule))
        return sorted(due | (set(verify_also) & set(self.selected)))

    def next_due(self, now: float) -> float | None:
        """The earliest timed retry after `now` (engine clock, seconds): a failing install's
        backoff ends, a failed probe is retried or a proof re-verified; None when none is
        kept. The loop wakes for it (inotify says nothing when only time passes). Times at or
        before `now` were the last pass's to act on and are left out, so the loop never spins."""
        schedule = plan.Schedule(self.cfg.reverify_interval_s, RETRY_FAILED_S)
        times = [b.retry_at for b in self.backoff.values()]
        times.append(plan.next_probe_at(self.proofs, now, schedule) or math.inf)
        later = [t for t in times if now < t < math.inf]
        return min(later, default=None)

    def forget(self) -> None:
        """After the instance vanished (unmounted): nothing observed, nothing proven."""
        self.observation = truth.EMPTY
        self.proofs.clear()

    def execute(
        self, actions: list[plan.Action], report: TickReport, prober: probe.Prober | None = None
    ) -> dict[str, int | None]:
        """Run the plan; a failing arch records its error and skips its remaining steps.

        Registers, the whole of a flush repair, take a short path (one write(2) each and a
        little bookkeeping): `scripts/bench.py`'s register row holds it to 1.5x the bare writes.
        With `prober`, an arch's probe starts right after its registration when nothing else in
        the plan follows for that arch; returns those arches with the inode of the entry written
        (None when it could not be read).

        Installs are pipelined: the steps of arches that need none run first; then each arch's
        steps run as soon as its emulator is installed, checked, checksummed and recorded in
        the state file, while other arches are still being installed (`_install`).
        Durations: `install` until the last emulator was in place, `register` the time spent
        recording and carrying out the steps (both overlap when installs ran).
        """
        idents: dict[str, int | None] = {}
        self._owned_before = dict(self.owned)
        report.actions, installs, regs = _sort(actions)
        report.durations_ms["register"] = 0.0
        if not installs:
            report.durations_ms["install"] = 0.0
            self._carry_out(actions, regs, report, prober, idents)
            return idents
        started = time.monotonic()
        after: dict[str, list[plan.Action]] = {a: [] for a in installs}
        now: list[plan.Action] = []
        for action in actions:
            after.get(str(getattr(action, "arch", None)), now).append(action)
        self._carry_out(now, _registers(now), report, prober, idents)

        def ready(arches: list[str]) -> None:  # installed and recorded: their steps now
            done = set(arches)  # carried out in plan order, whatever order they finished in
            steps = [step for arch in installs if arch in done for step in after.pop(arch)]
            self._carry_out(steps, _registers(steps), report, prober, idents, recorded=True)

        self._install(installs, report, ready)
        self._keep_installed([a for a in after if a in report.errors], report, prober, idents)
        report.durations_ms["install"] = _ms(started)
        return idents

    def _keep_installed(
        self,
        arches: list[str],
        report: TickReport,
        prober: probe.Prober | None,
        idents: dict[str, int | None],
    ) -> None:
        """Arches whose install failed (a broken or refused source) while the emulator already
        installed is still the recorded one, bytes and mode: their entry is restored with it,
        so a flush is repaired with what worked; the install's error stays in status.

        The others' entries of binfmtd's that still hold the installed inode, changed since
        (a user owns it, it is writable or setuid, its bytes differ) and not replaceable
        now, are removed: with `F` the kernel keeps running that file for every foreign
        binary, root's included, so a user owning it could run code in anyone's builds."""
        try:  # an install directory a user could change taints everything in it
            emulators.check_trusted_path(self.cfg.install_dir)
            kept = [a for a in arches if self._still_installed(a)]
        except InstallError:
            kept = []
        self._drop_tainted([a for a in arches if a not in kept], report)
        if not kept:
            return
        headers = {a: self.header(a) for a in (*kept, *self.native)}
        world = plan.World(
            self.observe(),
            dict(self.owned),
            dict.fromkeys(kept, True),
            headers,
            self.self_headers,
            self.native,
        )
        for arch in kept:
            want = plan.Desired(arch, self.registration(arch), arch not in self.operator_disabled)
            steps = plan.plan_arch(want, world, self.replace)
            why = report.errors.pop(arch)
            self._carry_out(steps, _registers(steps), report, prober, idents)
            report.errors.setdefault(arch, why)

    def _drop_tainted(self, arches: list[str], report: TickReport) -> None:
        """Remove binfmtd's entry of each of `arches` whose interpreter is the installed file
        it opened (the recorded inode) and that file is no longer as installed; its error says
        why. An emulator replaced by rename is left: the entry holds the inode it opened."""
        tainted = {a: why for a in arches if (why := self._tainted(a)) is not None}
        if not tainted:
            return
        try:
            obs = self.observe()
        except KernelError:
            return  # the instance went: nothing of ours left to remove
        for arch, why in tainted.items():
            name = self.registration(arch).name
            entry = obs.get(name)
            path = self.installed[arch].path
            if entry is None or entry.interpreter != path or not truth.is_ours(entry, self.owned):
                continue
            error = report.errors.pop(arch, "")
            self._apply(plan.Remove(arch, name, why), arch, report, info=True)
            removed = f"{name} removed: the installed emulator {why}"
            report.errors[arch] = f"{error}; {removed}" if error else removed

    def _tainted(self, arch: str) -> str | None:
        """Why the installed emulator of `arch`, still the inode it was installed as, must not
        be run any more (its owner or mode changed, or its bytes in place), or None."""
        record = self.installed.get(arch)
        if record is None:
            return None
        ident = emulators.file_id(record.path)
        if ident is None or _inode_of(ident) != _inode_of(record.file_id):
            return None  # gone or replaced by rename: the kernel holds the inode it opened
        if not emulators.installed_as_made(ident):
            return "is no longer root's 0755 file (its owner or mode changed)"
        if self._hash_matches(arch) is None:
            return "changed in place (its checksum differs)"
        return None

    def _carry_out(
        self,
        actions: list[plan.Action],
        regs: list[plan.Register],
        report: TickReport,
        prober: probe.Prober | None,
        idents: dict[str, int | None],
        recorded: bool = False,
    ) -> None:
        """Record the Registers (`_record_intents`), then run `actions` in order, starting an
        arch's probe after its last step. `recorded`: new installs are among them, so the
        state file is written first even when the ownership record does not change."""
        started = time.monotonic()
        self._record_intents(regs, report, recorded)
        info = self.log.is_enabled_for(logging.INFO)  # skip building events when filtered
        errors, owned, register = report.errors, self.owned, self.kernel.register
        failing = len(self._action_failures) > 0  # failures of this loop need no clearing
        # An arch's final step: its probe starts after it (only wanted with a prober).
        last = {getattr(a, "arch", None): a for a in actions} if prober is not None else {}
        register_type = plan.Register
        with self.kernel.batch():
            for action in actions:
                if type(action) is register_type:
                    if action.arch in errors:
                        continue
                    reg = action.reg
                    try:
                        register(reg)
                    except (KernelError, OSError) as exc:
                        self._failed(action, action.arch, exc, report)
                        continue
                    if owned.get(reg.name) is not reg:
                        self._own(reg)
                    report.written.add(action.arch)
                    if failing:
                        self._action_failures.cleared(action.arch)
                    if prober is not None and last[action.arch] is action:
                        idents[action.arch] = self.kernel.ident(action.reg.name)
                        prober.start(action.arch)  # the newest entry: nothing can shadow it
                    if info:
                        self._log_done(action)
                    continue
                key = plan.key(action)
                if key in errors or isinstance(action, plan.Install):  # installs ran before
                    continue
                self._apply(action, key, report, info)
        report.durations_ms["register"] += _ms(started)

    def _record_intents(
        self, registers: list[plan.Register], report: TickReport, recorded: bool = False
    ) -> None:
        """Write-ahead ownership: an entry is on record before it exists, so a kill between the
        two never leaves an entry of ours that a restart would call foreign. An arch whose
        record cannot be saved (ENOSPC...) registers nothing this pass. `recorded`: the
        state holds new installs, written here even when every entry is already on record
        (an emulator is registered only once its checksum is in the state file)."""
        owned, errors = self.owned, report.errors
        if not recorded:
            for action in registers:  # the common case (a flushed entry restored) costs ~2 µs
                if owned.get(action.reg.name) is not action.reg:
                    break
            else:
                return  # already on record, interned: nothing to write first
        regs = [a for a in registers if a.arch not in errors]
        if not recorded and all([owned.get(a.reg.name) == a.reg for a in regs]):
            return  # already on record (equal records): nothing to write first
        before = dict(self.owned)
        self.owned.update({a.reg.name: a.reg for a in regs})
        self._state_dirty = True
        # Mid-pipeline, fsync waits for the journal while probes wait for registrations: the
        # pass ends with a durable write (and a power loss removes the entries anyway).
        if not self._save_state_if_needed(report, [a.arch for a in regs], durable=not recorded):
            # not saved: nothing registered, the record stays as it was
            self.owned = before

    def _apply(self, action: plan.Action, key: str, report: TickReport, info: bool) -> None:
        """Carry out one action; `key` names it in errors (its arch, else its entry name)."""
        if isinstance(action, _JUDGEMENTS):
            if isinstance(action, plan.Conflict):
                self._say(
                    action.arch, "conflict_left_alone", entry=action.name, reason=action.reason
                )
            else:
                report.errors[action.arch] = f"refused to register {action.name}: {action.reason}"
                self._say(action.arch, "registration_refused", error=report.errors[action.arch])
            return
        try:
            self._do(action)
        except (KernelError, OSError) as exc:
            self._failed(action, key, exc, report)
            return
        if isinstance(action, _WRITES) and action.arch is not None:
            report.written.add(action.arch)
        self._done(action, key, info)

    def _failed(self, action: plan.Action, key: str, exc: Exception, report: TickReport) -> None:
        if isinstance(action, plan.Register):
            self._unrecord(action.reg.name)
        report.errors[key] = str(exc)
        self._action_failures.seen(key, str(exc), action=plan.describe(action))

    def _done(self, action: plan.Action, key: str, info: bool) -> None:
        self._action_failures.cleared(key)
        if info:
            self._log_done(action)

    def _log_done(self, action: plan.Action) -> None:
        self.log.info(
            _event(action),
            arch=getattr(action, "arch", None),
            reason=action.reason,
            **_action_fields(action),
        )

    def _unrecord(self, name: str) -> None:
        """A Register of `name` failed: the record goes back to what it was before this pass.
        A name binfmtd never held is not its own after all; a name it held stays on record
        (EEXIST: another tool registered it between binfmtd's removal of its clobber and the
        new registration), so the next pass restores it rather than leaving it as foreign."""
        previous = self._owned_before.get(name)
        if previous is None:
            self.owned.pop(name, None)
        else:
            self.owned[name] = previous
        self._state_dirty = True

    def _own(self, reg: Registration) -> None:
        """`reg` is registered: on record, and interned so the next pass compares by `is`."""
        if self.owned.get(reg.name) != reg:
            self._state_dirty = True
        self.owned[reg.name] = reg

    def _do(self, action: plan.Action) -> None:
        if isinstance(action, plan.Register):
            self.kernel.register(action.reg)
            self._own(action.reg)
        elif isinstance(action, plan.Remove):
            self.kernel.remove(action.name)
            if self.owned.pop(action.name, None) is not None:
                self._state_dirty = True
        elif isinstance(action, plan.SetEnabled):
            self.kernel.set_enabled(action.name, action.enabled)
        elif isinstance(action, plan.Disown):
            self.owned.pop(action.name, None)
            self._state_dirty = True

    def _say(self, arch: str, event: str, **fields: Any) -> None:
        """Log a repeated condition once, and again only when it changes."""
        text = f"{event}:{sorted(fields.items())}"
        key = f"{event}:{arch}"
        self._said_now.add(key)
        if self._said.get(key) != text:
            self._said[key] = text
            self.log.warning(event, arch=arch, **fields)

    def _settle_errors(self, report: TickReport) -> None:
        """This pass's failures are the errors status shows (a failure seen again says so)."""
        self.errors = {k: v for k, v in report.errors.items() if k in archmod.BY_NAME}
        self._said = {k: v for k, v in self._said.items() if k in self._said_now}
        self._said_now = set()

    def _install(
        self, arches: list[str], report: TickReport, ready: Callable[[list[str]], None]
    ) -> None:
        """Install `arches` (those whose backoff allows it now); `ready` is called on this thread
        with each batch of arches installed, fsynced into place and kept in `installed`. A
        failed arch gets its error in `report` and no call."""
        if self.source is None:
            self._fail_install(
                arches, report, f"emulator source unavailable: {self._source_problem()}"
            )
            return
        now = self.clock()
        self._absent = set()
        # The source's identity and the destination's: fixing either retries at once. The
        # destination is recorded as the attempt left it (it may have made the directory).
        sources = {a: self.source.fingerprint(a) for a in arches}

        def identity(arch: str) -> str:
            return f"{sources[arch]}|{emulators.destination_id(self.cfg.install_dir, arch)}"

        todo = [a for a in arches if backoff.due(self.backoff.get(a), now, identity(a))]
        for arch in set(arches) - set(todo):  # waiting: the last error stands, nothing is read
            report.errors[arch] = self.errors.get(arch) or self.backoff[arch].error
            self._install_failures.seen(arch, report.errors[arch])  # counted, not logged
        if todo:
            self._install_now(todo, report, ready)
            self._record_outcomes(todo, {a: identity(a) for a in todo}, now, report)

    def _install_now(
        self, arches: list[str], report: TickReport, ready: Callable[[list[str]], None]
    ) -> None:
        assert self.source is not None
        origins = self.source.origins(arches)
        owners, self._early_owners = self._early_owners, None
        if owners is None or not owners.asked >= set(origins.values()):
            owners = packages_soon(origins)
        try:
            self.source.check_available()
            emulators.ensure_install_dir(self.cfg.install_dir)
        except SOURCE_ERRORS as exc:
            self._fail_install(arches, report, _source_error(exc))
            return
        job = installs.Job(
            self.source,
            self.cfg.install_dir,
            self.host_elf_machine(),
            self.cfg.install_method is InstallMethod.AUTO,
            self.hashes,
            self.clock,
        )
        installs.install(job, arches, lambda batch: self._settle(batch, report, ready))
        self._add_versions([a for a in arches if a not in report.errors], owners)
        with contextlib.suppress(OSError):  # the new names, durable before the state says so
            emulators.fsync_dir(self.cfg.install_dir)
        self._save_state()

    def _settle(
        self,
        outcomes: list[installs.Outcome],
        report: TickReport,
        ready: Callable[[list[str]], None],
    ) -> None:
        """Keep a batch of install outcomes; hand the installed arches on once their new names
        are durable (one fsync of the install directory for the batch)."""
        done = []
        for outcome in outcomes:
            arch, record = outcome.arch, outcome.record
            if record is None:
                self._absent.update([arch] if outcome.absent else [])
                self._fail_install([arch], report, outcome.error or "not installed")
                continue
            self.installed[arch] = record
            self.file_ids[arch] = record.file_id
            self.log.info(
                "emulator_installed",
                arch=arch,
                interpreter=record.path,
                checksum=record.checksum,
                method=record.method,
            )
            self._install_failures.cleared(arch)
            done.append(arch)
        if done:
            self._state_dirty = True
            ready(done)

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

    def _add_versions(self, arches: list[str], early: PackageOwners | None) -> None:
        """`qemu-X --version` for an emulator whose version was not found in its bytes while
        hashing (usually nothing runs), once every install of the pass is done.
        Then the package each file came from, when the package manager knows it: `early` is
        the lookup started with the installs (or at start); files it did not ask about are
        asked now."""
        if not arches:
            return
        unread = [a for a in arches if self.installed[a].version is None]
        if unread:
            with ThreadPoolExecutor(min(installs.workers(), len(unread))) as pool:
                paths = [self.installed[a].path for a in unread]
                versions = pool.map(emulators.qemu_version, paths)
                for arch, version in zip(unread, versions, strict=True):
                    self.installed[arch] = replace(self.installed[arch], version=version)
        unknown = [a for a in arches if self.installed[a].package is None]
        asked, owners = (early.asked, early.result()) if early is not None else (frozenset(), {})
        owners = {
            **owners,
            **packages_of(o for o in (self.installed[a].origin for a in unknown) if o not in asked),
        }
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
        self._state_dirty = True

    def save_state(self) -> None:
        """Write the state file now (a failure is logged and retried on the next pass)."""
        self._state_dirty = True
        self._save_state_if_needed(TickReport())

    def own_entries(self) -> list[Entry]:
        """The entries in the instance that are binfmtd's (by record; an old state file's
        entries by adoption, as the next pass will record them)."""
        obs = self.observe()
        owned = dict(self.owned)
        if self._adopt:
            owned.update(truth.adopt(obs, self._adoptable()))
        return [e for e in obs.entries if truth.is_ours(e, owned)]

    def _save_state_if_needed(
        self, report: TickReport, arches: Iterable[str] = (), durable: bool = True
    ) -> bool:
        """Write installs and the ownership record; a failure (ENOSPC...) becomes the error
        of `arches` (default: every arch this pass acted on). `durable`: see write_state; a
        write that is not leaves the state marked for the next durable one. False when the
        write failed."""
        if not self._state_dirty:
            return True
        owned = {name: reg.register_string() for name, reg in self.owned.items()}
        try:
            emulators.write_state(
                self.cfg.state_file,
                self.installed,
                self.flags,
                owned,
                hashes=self.hashes,
                durable=durable,
                operator_disabled=self.operator_disabled,
            )
        except OSError as exc:
            why = f"state file {self.cfg.state_file} not saved: {exc}; binfmtd retries every pass"
            acted = list(arches) or [str(getattr(a, "arch", None)) for a in report.actions]
            for arch in acted:
                if arch in archmod.BY_NAME:
                    report.errors.setdefault(arch, why)
            self._say("-", "state_save_failed", error=why)
            return False
        self._state_dirty = not durable
        return True

    def verify(self, arches: Iterable[str], report: TickReport | None = None) -> None:
        """Probe `arches` in parallel; each result counts for the handler it ran through."""
        self._verify(self._prober(), list(arches), {}, report or TickReport(), None)

    def _verify(
        self,
        prober: probe.Prober,
        arches: list[str],
        idents: Mapping[str, int | None],
        report: TickReport,
        progress: Callable[[], None] | None,
        changed: Callable[[], bool] | None = None,
    ) -> None:
        """Start the probes of `arches` not started yet, then take every result as it comes.

        A result counts for the handler of this pass's observation. A probe started right after
        its registration (`idents`: arch -> inode of the entry just written) counts only when
        that handler is still exactly that entry; otherwise it is dropped (the change woke the
        watcher: the next pass probes again). Nor does the result of an arch whose emulator
        file went while it ran (`_recheck`).
        """
        handlers = {a: self.observation.handler(self.header(a)) for a in prober.started}
        for arch in arches:
            if arch not in prober.started:
                handlers[arch] = self.observation.handler(self.header(arch))
                prober.start(arch)
        left = len(prober.started)
        shown = time.monotonic()
        moved: set[str] = set()

        def look() -> None:  # a drift while the probes run shows now, not after the pass
            if changed is not None and changed():
                moved.update(self._recheck(progress))

        for result in prober.results(look if changed is not None else None):
            left -= 1
            arch = result.arch
            look()
            handler = handlers.get(arch)
            if arch in idents and (handler is None or handler.ident != idents[arch]):
                continue  # the entry changed between its registration and this observation
            if arch in moved:
                continue  # its emulator file went while it ran: the next pass installs it
            self._take(result, handler, report)
            if progress is not None and left and time.monotonic() - shown >= PROGRESS_EVERY_S:
                progress()  # results so far, published while the other probes run
                shown = time.monotonic()

    def _recheck(self, progress: Callable[[], None] | None) -> set[str]:
        """A drift while this pass runs: observe the instance again and look for emulator files
        that went (removed or replaced: another inode at the path); their proofs are dropped.
        The observation is published at once (the pass may have read the drift already, after
        its own changes, without publishing it), so what broke stops showing as verified now;
        the next pass (the watcher's events are kept for it) repairs it. Returns the arches
        whose file went. Costs one observation, a stat per installed emulator and a publish
        (about 2 ms for 33)."""
        moved = set()
        for arch, record in self.installed.items():
            recorded = _inode_of(self.file_ids.get(arch) or record.file_id)
            try:
                now = os.lstat(record.path).st_ino
            except OSError:
                now = None
            if now != recorded and self.proofs.pop(arch, None) is not None:
                moved.add(arch)
        obs = self.observe()
        if progress is not None:  # even when `obs` is this pass's: what was published may be older
            self._show(obs, progress)
        else:
            self._log_instance_change(obs)
            self.observation = obs
        return moved

    def _take(self, result: truth.ProbeResult, handler: Entry | None, report: TickReport) -> None:
        arch = result.arch
        self.proofs[arch] = Proof(result, handler)
        (report.verified if result.ok else report.failed).append(arch)
        if result.ok:
            self.log.info("probe_passed", arch=arch, duration_ms=round(result.duration_ms, 1))
            self._probe_failures.cleared(arch)
        else:
            self._probe_failures.seen(arch, result.error or "probe failed")

    def remove_own_entries(self) -> list[str]:
        """Remove every entry binfmtd registered (by record; never others', never `status`)."""
        removed = []
        for entry in self.observe().entries:
            if truth.is_ours(entry, self.owned):
                self.kernel.remove(entry.name)
                self.owned.pop(entry.name, None)
                removed.append(entry.name)
        self._state_dirty = bool(removed)
        self._save_state_if_needed(TickReport())
        return removed

    # ------------------------------------------------------------ status

    def statuses(self) -> list[ArchStatus]:
        """A row for every selected arch, and for every native arch an entry catches."""
        if self._rows is not None:
            return self._rows
        rows = [self.status_of(a) for a in self.selected]
        return rows + [r for a in self.native if (r := self._native_row(a)) is not None]

    @contextlib.contextmanager
    def held_still(self) -> Iterator[None]:
        """A block in which nothing changes the engine (one publish): `statuses()` is worked
        out once in it, however many views ask for it."""
        self._rows = None
        self._rows = self.statuses()
        try:
            yield
        finally:
            self._rows = None

    def facts(self, arch: str, native: bool = False) -> Facts:
        """What `status.derive` needs for `arch`, from this pass's observation."""
        return Facts(
            arch=arch,
            obs=self.observation,
            header=self.header(arch),
            name=archmod.BY_NAME[arch].entry_name,
            owned=self.owned,
            operator_disabled=arch in self.operator_disabled,
            proof=self.proofs.get(arch),
            error=self.errors.get(arch),
            root=str(self.kernel.root),
            native=native,
            interpreter_header=b"" if native else self._interpreter_header(arch),
        )

    def _interpreter_header(self, arch: str) -> bytes:
        """The first bytes of `arch`'s installed emulator, read again when its identity
        changes; b"" when not installed or unreadable."""
        record = self.installed.get(arch)
        if record is None:
            return b""
        ident = self.file_ids.get(arch) or record.file_id
        cached = self._interpreter_headers.get(arch)
        if cached is not None and cached[0] == (record.path, ident):
            return cached[1]
        head = _regular_file_head(record.path)
        self._interpreter_headers[arch] = ((record.path, ident), head)
        return head

    def status_of(self, arch: str) -> ArchStatus:
        """One arch's row; `verified` only when binfmtd's entry handles it now and its probe
        ran through exactly that entry and passed."""
        verdict = derive(self.facts(arch))
        assert verdict is not None
        return self._row(arch, verdict.state, verdict.handler, verdict.owner, verdict.detail)

    def _native_row(self, arch: str) -> ArchStatus | None:
        verdict = derive(self.facts(arch, native=True))
        if verdict is None:
            return None
        return self._row(arch, verdict.state, verdict.handler, verdict.owner, verdict.detail)

    def _row(
        self, arch: str, state: ArchState, handler: Entry | None, owner: Owner, detail: str | None
    ) -> ArchStatus:
        shown = handler or self.observation.get(archmod.BY_NAME[arch].entry_name)
        record = self.installed.get(arch)
        ours = shown is not None and truth.is_ours(shown, self.owned) and record is not None
        if shown is not None and detail and not truth.is_ours(shown, self.owned):
            detail = f"{detail}; origin: {self._origin_of(shown.name)}"
        proof = self.proofs.get(arch)
        return ArchStatus(
            arch=arch,
            platforms=archmod.BY_NAME[arch].platforms,
            state=state,
            registered=shown is not None,
            enabled=bool(shown and shown.enabled),
            flags=shown.flags if shown else "",
            interpreter=shown.interpreter if shown else None,
            checksum=record.checksum if ours and record else None,
            qemu_version=record.version if ours and record else None,
            probe=proof.result if proof else None,
            error=detail,
            handler=handler,
            owner=owner,
        )

    def _origin_of(self, name: str) -> str:
        """Where another tool's entry comes from; boot-time sources are read once per pass."""
        if self._origins is None:
            self._origins = origin.scan(self.origin_roots)
        return self._origins.describe(name)

    def native_platforms(self) -> list[str]:
        """Platforms of the native arches no entry is in the way of."""
        shadowed = {a for a in self.native if self._native_row(a) is not None}
        return archmod.platforms_of([a for a in self.native if a not in shadowed])

    def verified_platforms(self) -> list[str]:
        """Native platforms first, then the emulated ones whose probe passed."""
        native = self.native_platforms()
        emulated = [s.arch for s in self.statuses() if s.state.working]
        return native + [p for p in archmod.platforms_of(emulated) if p not in native]


def _source_ok(cfg: Config) -> bool:
    try:
        Source(cfg.source)
    except InstallError:
        return False
    return True


def _hold(
    actions: list[plan.Action], hold: Mapping[str, str], report: TickReport
) -> list[plan.Action]:
    """Drop the repairs of held arches (another tool keeps rewriting them); say why."""
    kept = []
    for action in actions:
        arch = getattr(action, "arch", None)
        if (
            isinstance(arch, str)
            and arch in hold
            and not isinstance(action, plan.Conflict | plan.Refuse)
        ):
            report.errors[arch] = hold[arch]
        else:
            kept.append(action)
    return kept


_JUDGEMENTS = (plan.Conflict, plan.Refuse)
_WRITES = (plan.Register, plan.Remove, plan.SetEnabled)


def _sort(
    actions: list[plan.Action],
) -> tuple[list[plan.Action], list[str], list[plan.Register]]:
    """One pass over a plan: (what is carried out, arches to install, the Registers)."""
    done: list[plan.Action] = []
    installs: list[str] = []
    regs: list[plan.Register] = []
    for a in actions:
        if isinstance(a, plan.Register):
            regs.append(a)
        elif isinstance(a, plan.Install):
            installs.append(a.arch)
        elif isinstance(a, _JUDGEMENTS):
            continue
        done.append(a)
    return done, installs, regs


def _inode_of(file_id: str | None) -> int | None:
    """The inode in a `emulators.file_id` (its first field)."""
    head = (file_id or "").split(":", 1)[0]
    return int(head) if head.isdigit() else None


def _linked_inode(record: Installed) -> int | None:
    """The inode a hard-link install shares with its source (the first field of file_id)."""
    if record.method != emulators.Method.LINK:
        return None
    return _inode_of(record.file_id)


def _registers(actions: list[plan.Action]) -> list[plan.Register]:
    return [a for a in actions if isinstance(a, plan.Register)]


def _same_inode(ident: str, record: Installed) -> bool:
    """Whether `ident` names the inode the record was installed as (a hard-link install is
    trusted for its own inode only: a new one is never adopted by a re-hash)."""
    linked = _linked_inode(record)
    return linked is None or _inode_of(ident) == linked


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


def _regular_file_head(path: str) -> bytes:
    """The first bytes binfmt_misc compares of the regular file `path` (never following a
    symlink, never blocking on a FIFO); b"" for anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.read(fd, archmod.MAX_HEADER) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    except OSError:
        return b""
    finally:
        os.close(fd)


def _self_headers() -> tuple[bytes, ...]:
    """The first bytes of this process's executable and of the running Python (both are
    what binfmtd must never route through an emulator)."""
    heads = []
    for path in ("/proc/self/exe", os.path.realpath(sys.executable)):
        try:
            with open(path, "rb") as handle:
                heads.append(handle.read(archmod.MAX_HEADER))
        except OSError:
            continue
    return tuple(dict.fromkeys(h for h in heads if h))


def _read_owned(path: str) -> tuple[dict[str, Registration], bool]:
    """The ownership record, and whether it is missing (an older state file: adopt)."""
    record = emulators.read_owned(path)
    if record is None:
        return {}, True
    owned = {}
    for name, line in record.items():
        try:
            owned[name] = parse_register_string(line)
        except FormatError:
            continue
    return owned, False
