"""The long-running daemon: the tick loop (observe, plan, execute, verify, publish, notify).

One thread owns the engine: the loop below. The API server runs in its own thread and only
reads pre-rendered snapshots; mutations are queued to the loop and answered when done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import os
import queue
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from binfmtd import (
    __version__,
    config,
    emulators,
    headstart,
    log,
    ns,
    plan,
    preflight,
    views,
    watch,
    wire,
)
from binfmtd.binfmt import credentials_warning
from binfmtd.engine import RETRY_FAILED_S, Engine, TickReport
from binfmtd.kernel import KernelError
from binfmtd.lock import Lock
from binfmtd.metrics import Metrics
from binfmtd.notify import Notifier
from binfmtd.preflight import Exit, PreflightError
from binfmtd.sources import PackageOwners
from binfmtd.status import ArchState
from binfmtd.wire import ApiError

__all__ = ["RETRY_FAILED_S", "Daemon", "DaemonApi", "serve"]
STOP_POLL_S = 0.05  # how often, after SIGTERM, helpers the ending tick starts are killed
# Unexpected exceptions in this many passes in a row end the daemon with Exit.SOFTWARE (72).
MAX_FAILED_PASSES = 3
# Keys a running daemon cannot change: the lock and socket it holds, the binfmt_misc mount and
# install directory its entries belong to, the logger configured once at start.
RESTART_KEYS = frozenset({"binfmt_misc", "install_dir", "lock_file", "api", "log"})
POLL_FALLBACK_S = 1.0  # the pass interval when inotify is unavailable
# Needed only once the first pass is done; imported meanwhile on a thread (see `_preload`).
AFTER_FIRST_PASS = ("binfmtd.server", "sdnotify")


@dataclass
class _Command:
    action: str
    arg: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: wire.Record | None = None
    error: ApiError | None = None


class Published:
    """Immutable views of the daemon's state (wire records), swapped atomically after each tick."""

    def __init__(self) -> None:
        self.version = 0
        self.status: wire.StatusRecord = wire.StatusRecord(wire.DaemonRecord(__version__, 0), ())
        self.platforms = wire.PlatformsRecord(())
        self.binfmt = wire.BinfmtRecord((), ())
        self.worker: wire.WorkerRecord | None = None
        self.last_tick = 0.0
        self.ready = False
        self.stale_since: float | None = None

    def swap(
        self,
        status: wire.StatusRecord,
        platforms: wire.PlatformsRecord,
        binfmt: wire.BinfmtRecord,
        worker: wire.WorkerRecord | None,
    ) -> None:
        """Replace every view, then bump the version the server caches encoded answers by."""
        self.status, self.platforms, self.binfmt, self.worker = status, platforms, binfmt, worker
        self.version += 1


class Daemon:
    """Everything the running daemon holds."""

    def __init__(
        self,
        cfg: config.Config,
        *,
        sandbox: ns.SandboxDirs | None,
        config_path: str | None,
        clock: Callable[[], float] = time.time,
        safe_mode: bool | None = None,
        packages: PackageOwners | None = None,
    ) -> None:
        self.cfg = cfg
        self.sandbox = sandbox
        self.config_path = config_path
        # Whether a reload applies the trust rule: as decided at start (None: decide now).
        self.safe_mode = _needs_safe_mode() if safe_mode is None else safe_mode
        self.clock = clock
        self.log = log.get("binfmtd.daemon")
        self.engine = Engine(cfg, log.get("binfmtd.engine"), clock, packages=packages)
        self.notifier = Notifier()
        self.published = Published()
        self.commands: queue.Queue[_Command] = queue.Queue()
        self._queue_lock = threading.Lock()  # no mutation is queued after the stop drained it
        self.in_loop = False
        self._ender: threading.Thread | None = None
        self._ender_lock = threading.RLock()  # re-entrant: a second signal may nest the handler
        self.wake = watch.Waker()
        self.pacer = watch.Pacer()
        self.stopping = False
        self.reload_requested = False
        self.started_at = clock()
        self.last_reconcile: float | None = None
        self.worker: Any = None
        self._worker_key: tuple[Any, ...] = ()
        self._last_states: dict[str, tuple[str, str | None]] = {}
        self.metrics = Metrics()
        self.failed_passes = 0
        self.exit_code = Exit.OK
        self._logged_credentials: list[str] = []
        self.server: Any = None
        self._metrics_warning: str | None = None  # the metrics port could not be served
        # The last reload's problem (refused file, keys waiting for a restart): in status
        # until a reload succeeds, so a SIGHUP with no caller to answer is not silent.
        self._reload_warning: str | None = None
        self._watcher: watch.Watcher | None = None  # the loop's, while it runs

    # ------------------------------------------------------------ lifecycle

    def run(self) -> int:
        """Preflight, first provision, READY=1, then the loop until SIGTERM."""
        preflight.run_all(self.engine.kernel)
        self._install_signals()
        self.engine.start_probe_runner()  # it boots while the host's own arches are detected
        self.engine.detect_native()
        self._note_flags_upgrade()
        self._start_worker()
        self.in_loop = True  # from here on, SIGTERM also cuts the tick in progress short
        loading = _preload(AFTER_FIRST_PASS)
        self._tick()
        self.published.ready = True
        self._publish()  # READY=1 must never be followed by a status that says "starting"
        loading.join()
        self._start_server()
        self.notifier.ready(self._summary())
        self.log.info(
            "daemon_ready",
            summary=self._summary(),
            sandbox=self.sandbox.name if self.sandbox else None,
        )
        try:
            self._loop()
        finally:
            self.in_loop = False
            self._shutdown()
        return self.exit_code

    def _loop(self) -> None:
        """Sleep until something changes (inotify), a command or signal arrives, a held repair
        is released, or the slow safety pass is due; then reconcile once for all of it."""
        watcher = self._watcher = watch.Watcher(self.wake)
        if not watcher.active:
            self.log.warning("inotify_unavailable", error=watcher.error, poll_s=POLL_FALLBACK_S)
        due = watcher.watch(self._watch_targets())
        next_pass = time.monotonic() + self._safety_s(watcher)
        try:
            while not self.stopping:
                release = min(self.pacer.next_release(time.monotonic()) or math.inf, self._due())
                # A watch just (re)added cannot report what changed before it existed (between
                # the first pass and READY, or a remount and its re-watch): a pass runs now.
                change = watcher.wait(0.0 if due else self._wait_s(min(next_pass, release)))
                self.wake.clear()
                if self.stopping:
                    break
                if self.reload_requested:
                    with contextlib.suppress(ApiError):  # logged; the old configuration runs on
                        self._reload()
                self._run_commands()
                now = time.monotonic()
                if (change or due or now >= min(next_pass, release)) and not self.stopping:
                    self._loop_pass(change)
                    next_pass = time.monotonic() + self._safety_s(watcher)
                due = watcher.watch(self._watch_targets())  # re-watch after unmount, reload
                self._tick_worker()
                self.notifier.watchdog()
        finally:
            self._watcher = None
            watcher.close()

    def _loop_pass(self, change: watch.Change) -> None:
        """One reconcile pass of the loop; repeated repairs of an arch put it on hold."""
        report = self._tick()
        acted = {getattr(a, "arch", None) for a in report.actions}
        # A round of a fight is a write binfmtd made, even when the arch's next step then
        # failed (another tool registered the name again between binfmtd's removal and its
        # registration: EEXIST); an install that only failed is not one.
        done = {a for a in acted if isinstance(a, str) and a not in report.errors}
        repaired = sorted(done | report.written)
        now = time.monotonic()
        for arch in self.pacer.repaired(repaired, now):
            self.log.warning(
                "repair_backed_off",
                arch=arch,
                trigger=change.reason,
                why=self.pacer.held(now)[arch],
            )

    def _due(self) -> float:
        """When (monotonic) the engine's earliest timed retry falls due: an install backoff
        ending (2 s after a first failure), a failed probe's retry; inf when none."""
        now = self.clock()
        due = self.engine.next_due(now)
        return math.inf if due is None else time.monotonic() + (due - now)

    def _watch_targets(self) -> list[watch.Target]:
        return watch.targets(self.cfg.binfmt_misc, self.cfg.install_dir, self.engine.source)

    def _safety_s(self, watcher: watch.Watcher) -> float:
        interval = self.cfg.reconcile_interval_s
        return interval if watcher.active else min(interval, POLL_FALLBACK_S)

    def _wait_s(self, next_pass: float) -> float:
        """Until the next deadline: a pass (safety, held repair), worker tick, watchdog ping."""
        now = time.monotonic()
        deadlines = [next_pass]
        if self.worker is not None:
            deadlines.append(now + 0.5)
        if self.notifier.watchdog_s:
            deadlines.append(now + self.notifier.watchdog_s / 4)
        return max(0.0, min(deadlines) - now)

    def _tick_worker(self) -> None:
        """Let the supervisor follow the verified set; publish when what it shows changed."""
        if self.worker is None:
            return
        self.worker.tick(time.monotonic(), tuple(self.engine.verified_platforms()))
        status = self.worker.status
        shown = (status.state, status.pid, status.advertised_platforms, status.last_error)
        key = (*shown, status.proven, status.proving, status.refused, status.unproven)
        if key != self._worker_key:
            self._worker_key = key
            self._publish()

    def _shutdown(self) -> None:
        self.notifier.stopping()
        refused = self._refuse_queued()
        self.log.info("daemon_stopping", remove_on_stop=self.cfg.remove_on_stop, refused=refused)
        if self.server is not None:
            self.server.close()
        if self.worker is not None:
            self.worker.stop()
        self.metrics.close()
        self.engine.close()
        if self.cfg.remove_on_stop:
            with contextlib.suppress(KernelError, OSError):
                removed = self.engine.remove_own_entries()
                self.log.info("entries_removed_on_stop", entries=removed)

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        # Python runs handlers in the main thread only, and a main thread blocked on a lock
        # (waiting for probe threads) does not wake when the kernel hands the signal to another
        # thread. The wakeup fd is written at C level by whichever thread receives it, so a
        # watcher thread can act at once.
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        watcher = threading.Thread(
            target=self._watch_signals, args=(read_end,), name="binfmtd-signals", daemon=True
        )
        watcher.start()

    def _watch_signals(self, read_end: int) -> None:
        while True:
            select.select([read_end], [], [])
            with contextlib.suppress(BlockingIOError):
                received = os.read(read_end, 64)
                # Only stopping is urgent (and idempotent); SIGHUP's handler runs in the main
                # thread within one loop wait, and acting twice would reload twice.
                if {signal.SIGTERM, signal.SIGINT} & set(received):
                    self._stop_now()

    def _on_stop(self, _sig: int, _frame: object) -> None:
        self._stop_now()

    def _stop_now(self) -> None:
        """Stop: the loop ends after its current step; the tick in progress is cut short."""
        self.stopping = True
        self.wake.set()
        with self._ender_lock:
            if self._ender is not None or not self.in_loop:
                return
            self._ender = threading.Thread(target=self._end_tick, name="binfmtd-stop", daemon=True)
        self._ender.start()

    def _end_tick(self) -> None:
        """Until the loop has left its tick: kill every probe or `--version` run, including
        ones the tick starts after the signal, so a tick in progress ends now rather than
        after its timeouts. The BuildKit worker is left to its graceful stop."""
        import psutil  # only on the way out: not loaded (time, memory) by a daemon that runs

        while self.in_loop:
            worker = self.worker.status.pid if self.worker is not None else None
            with contextlib.suppress(psutil.Error, OSError):
                for child in psutil.Process().children():
                    if child.pid == worker:
                        continue
                    # The probe runner's probes first: killed after it, they would run on.
                    with contextlib.suppress(psutil.Error):
                        for descendant in child.children(recursive=True):
                            with contextlib.suppress(psutil.Error):
                                descendant.kill()
                        child.kill()
            time.sleep(STOP_POLL_S)

    def _on_hup(self, _sig: int, _frame: object) -> None:
        self.reload_requested = True
        self.wake.set()

    # ------------------------------------------------------------ the tick

    def _tick(self, verify_also: tuple[str, ...] = ()) -> TickReport:
        """One guarded pass: an unexpected exception is logged with its traceback, the last
        good status stays published (marked stale), and only MAX_FAILED_PASSES in a row end
        the daemon with Exit.SOFTWARE."""
        started = time.monotonic()
        try:
            report = self._pass(verify_also)
        except Exception as exc:  # the per-pass guard: never let one pass kill the daemon
            return self._pass_failed(exc)
        self.failed_passes = 0
        self.published.stale_since = None
        self.last_reconcile = self.clock()
        self._log_credentials()
        self._publish()
        done = [a for a in report.actions if plan.key(a) not in report.errors]
        self.metrics.observe_actions((type(a).__name__.lower(), a.reason) for a in done)
        # Info only when something changed: a repair that worked, or an arch whose state or
        # error moved. Recurring failures are logged by the engine when they start and end.
        states = {a.arch: (a.state, a.error) for a in self.published.status.arches}
        if done or states != self._last_states:
            self.log.info(
                "reconcile_finished",
                repaired=[plan.describe(a) for a in done],
                verified=report.verified,
                failed=report.failed,
                errors=report.errors,
                duration_ms=round((time.monotonic() - started) * 1000, 1),
                phases_ms=report.durations_ms,  # observe, install, register, verify
            )
            self.notifier.status(self._summary())
        self._last_states = states
        return report

    def _pass(self, verify_also: tuple[str, ...]) -> TickReport:
        try:
            return self.engine.tick(
                verify_also=verify_also,
                hold=self.pacer.held(time.monotonic()),
                progress=self._publish,  # a vanished entry stops showing as verified now
                changed=self._watcher.changed if self._watcher is not None else None,
            )
        except KernelError as exc:
            return self._recover_mount(exc)

    def _pass_failed(self, exc: Exception) -> TickReport:
        self.failed_passes += 1
        self.log.exception(
            "reconcile_crashed",
            error=f"{type(exc).__name__}: {exc}",
            failed_passes=self.failed_passes,
            limit=MAX_FAILED_PASSES,
        )
        if self.published.stale_since is None:
            self.published.stale_since = self.clock()
        self._publish_stale()
        if self.failed_passes >= MAX_FAILED_PASSES:
            self.log.error("daemon_giving_up", failed_passes=self.failed_passes)
            self.exit_code = Exit.SOFTWARE
            self.stopping = True
        return TickReport(errors={"internal": f"{type(exc).__name__}: {exc}"})

    def _publish_stale(self) -> None:
        """Keep serving the last good views, marked stale (never re-derived from a bad pass)."""
        old = self.published
        daemon = old.status.daemon.replace(
            stale=True,
            stale_since=old.stale_since,
            failed_passes=self.failed_passes,
        )
        old.swap(old.status.replace(daemon=daemon), old.platforms, old.binfmt, old.worker)

    def _note_flags_upgrade(self) -> None:
        """Say it once when this install relied on binfmtd 0.1's default flags (with C)."""
        if "C" in self.engine.flags:
            return
        recorded = emulators.read_state_flags(self.cfg.state_file)
        try:
            own = self.engine.own_entries()
        except (KernelError, OSError):
            own = []  # the first tick reports an unreadable instance
        with_c = sorted(e.name for e in own if "C" in e.flags)
        if not with_c and recorded != "" and "C" not in (recorded or ""):
            return
        self.log.warning(
            "flags_default_changed",
            flags=self.engine.flags,
            previous=recorded or config.OLD_DEFAULT_FLAGS,
            entries=with_c,
            hint=(
                "binfmtd's default flags changed from FPC to POF: entries are registered without "
                "C, so setuid programs (sudo) inside emulated containers no longer run with "
                "their owner's credentials; that closes a local root hole. If you need them, "
                f"set `flags: {config.OLD_DEFAULT_FLAGS}` explicitly (see the config reference "
                "for what C costs)"
            ),
        )
        if recorded is not None:  # record the new flags so the notice is said once
            self.engine.save_state()

    def _credential_entries(self) -> list[str]:
        """Entries in the instance carrying C (ours or another tool's)."""
        return sorted(e.name for e in self.engine.observation.entries if "C" in e.flags)

    def _warnings(self) -> list[str]:
        found = [credentials_warning(name) for name in self._credential_entries()]
        found += [self._metrics_warning] if self._metrics_warning else []
        return found + ([self._reload_warning] if self._reload_warning else [])

    def _log_credentials(self) -> None:
        """A warning whenever the set of entries carrying C changes to a non-empty one."""
        entries = self._credential_entries()
        if entries != self._logged_credentials and entries:
            self.log.warning(
                "credentials_flag_set",
                entries=entries,
                hint="C runs QEMU as root for setuid foreign binaries: a local root hole",
            )
        self._logged_credentials = entries

    def _recover_mount(self, exc: KernelError) -> TickReport:
        """binfmt_misc vanished under us (unmounted): mount it again, then reconcile."""
        self.log.warning("binfmt_misc_unavailable", error=str(exc))
        self.engine.forget()
        try:
            preflight.ensure_mounted(self.engine.kernel)
            self.log.info("binfmt_misc_remounted", path=str(self.engine.kernel.root))
            return self.engine.tick()
        except (PreflightError, KernelError) as again:
            self.log.error("binfmt_misc_remount_failed", error=str(again))
            return TickReport(errors={"binfmt_misc": str(again)})

    # ------------------------------------------------------------ publishing

    def _publish(self) -> None:
        with self.engine.held_still():  # the views share one derivation of every row
            self._publish_now()

    def _publish_now(self) -> None:
        engine = self.engine
        arches = views.arch_records(engine)
        platforms = views.platforms_record(engine)
        worker = None
        if self.worker is not None:
            worker = self.worker.snapshot(self.engine.verified_platforms())
        daemon = wire.DaemonRecord(
            version=__version__,
            pid=os.getpid(),
            started_at=self.started_at,
            sandbox=self.sandbox is not None,
            sandbox_name=self.sandbox.name if self.sandbox else None,
            binfmt_misc=self.cfg.binfmt_misc,
            ready=self.published.ready,
            last_reconcile=self.last_reconcile,
            config=self.cfg.config_file,
            reconcile_interval_s=self.cfg.reconcile_interval_s,
            binfmt_misc_enabled=engine.observation.enabled,
        )
        warnings = tuple(self._warnings())
        status = wire.StatusRecord(
            daemon,
            arches,
            platforms.native,
            worker,
            warnings,
            native_proof=dict(engine.native_proof),
        )
        self.published.last_tick = time.monotonic()
        self.published.swap(status, platforms, views.binfmt_record(engine, arches), worker)
        self.metrics.observe_status(status)

    def _native_platforms(self) -> list[str]:
        return self.engine.native_platforms()

    def _summary(self) -> str:
        rows = self.engine.statuses()
        ok = sum(1 for r in rows if r.state.working)
        bad = [r.arch for r in rows if not r.state.fine]
        text = f"{ok}/{len(rows)} architectures verified"
        return text + (f"; not working: {', '.join(bad)}" if bad else "")

    # ------------------------------------------------------------ commands from the API

    def submit(self, action: str, arg: dict[str, Any], timeout: float = 120.0) -> wire.Record:
        """Queue a mutation for the loop thread and wait for its answer.

        Raises ApiError: 503 once the daemon is stopping (the mutation was not run), 504 when
        the loop did not answer within `timeout` seconds, or the mutation's own error.
        """
        command = _Command(action, arg)
        with self._queue_lock:
            if self.stopping:
                raise ApiError(503, f"{action} was not run: binfmtd is stopping")
            self.commands.put(command)
        self.wake.set()
        if not command.done.wait(timeout):
            raise ApiError(504, f"{action} did not finish within {timeout:g} s")
        if command.error is not None:
            raise command.error
        assert command.result is not None
        return command.result

    def _refuse_queued(self) -> list[str]:
        """At stop: answer every mutation still queued with 503; none of them ran."""
        refused: list[str] = []
        with self._queue_lock:
            self.stopping = True
            while True:
                try:
                    command = self.commands.get_nowait()
                except queue.Empty:
                    return refused
                command.error = ApiError(503, f"{command.action} was not run: binfmtd is stopping")
                command.done.set()
                refused.append(command.action)

    def _run_commands(self) -> None:
        while not self.stopping:  # at stop, what is still queued is refused, not run
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return
            try:
                command.result = self._execute(command.action, command.arg)
            except ApiError as exc:
                command.error = exc
            except Exception as exc:  # a bad request must never stop the loop
                self.log.exception("command_failed", action=command.action)
                command.error = ApiError(500, f"{command.action} failed: {exc}")
            finally:
                command.done.set()

    def _execute(self, action: str, arg: dict[str, Any]) -> wire.Record:
        selected = set(self.engine.selected)
        if action == "verify":
            arches = list(arg.get("arches") or sorted(selected))
            unknown = [a for a in arches if a not in selected]
            if unknown:
                raise ApiError(*self._not_selected(unknown))
            # Disabled is what the kernel does, not only what was asked: an arch the operator
            # disabled that another tool's entry now runs is probed like any other.
            off = sorted(
                a
                for a in set(arches) & self.engine.operator_disabled
                if self.engine.status_of(a).state is ArchState.OPERATOR_DISABLED
            )
            report = self._tick(verify_also=tuple(a for a in arches if a not in off))
            verified = tuple(a for a in report.verified if a not in off)
            failed = tuple(a for a in report.failed if a not in off)
            return wire.VerifyResult(verified, failed, tuple(off))
        if action == "reconcile":
            report = self._tick()
            actions = tuple(plan.describe(a) for a in report.actions)
            return wire.ReconcileResult(actions, report.errors)
        if action in {"enable", "disable"}:
            return self._set_enabled(str(arg.get("arch", "")), action == "enable", selected)
        if action == "reload":
            return self._reload()
        raise ApiError(404, f"unknown action {action!r}")

    def _not_selected(self, arches: list[str]) -> tuple[int, str]:
        """(HTTP status, message) for arches binfmtd does not provision: the host's own
        architecture (409: the kernel runs it with no emulator, there is nothing to switch),
        excluded by `exclude`, or not named in `arches` (404)."""
        native = [a for a in arches if a in self.engine.native]
        if native and len(native) == len(arches):
            verb = "is" if len(native) == 1 else "are"
            return 409, (
                f"{', '.join(native)} {verb} this host's native architecture: the kernel runs "
                "its binaries directly, with no emulator, so binfmtd neither registers nor "
                "switches it"
            )
        cfg = self.engine.cfg
        where = self.config_path or "the built-in default configuration"
        parts = []
        for arch in arches:
            if arch in self.engine.native:
                parts.append(f"{arch} (this host's native architecture)")
            elif arch in cfg.exclude:
                parts.append(f"{arch} (excluded by `exclude` in {where})")
            elif "all" in cfg.arches:
                parts.append(f"{arch} (the emulator source has no qemu-{arch})")
            else:
                parts.append(f"{arch} (not in `arches` in {where})")
        return 404, f"not configured: {', '.join(parts)}"

    def _set_enabled(self, arch: str, enable: bool, selected: set[str]) -> wire.ArchChange:
        if arch not in selected:
            raise ApiError(*self._not_selected([arch]))
        was_disabled = arch in self.engine.operator_disabled
        if enable:
            self.engine.operator_disabled.discard(arch)
        else:
            self.engine.operator_disabled.add(arch)
        self.engine.operator_changed.add(arch)
        self._tick()
        row = self.engine.status_of(arch)
        if not enable and row.state not in {
            ArchState.OPERATOR_DISABLED,
            ArchState.INSTANCE_DISABLED,
        }:
            # The kernel still runs these binaries (another tool's entry, or a failed write):
            # never answer "disabled" while that is not what the kernel does. A refusal
            # changes nothing: the wish is dropped again (else it took effect later, e.g. once
            # that tool's entry went, leaving the arch unhandled after "refused").
            if not was_disabled:
                self.engine.operator_disabled.discard(arch)
                self.engine.operator_changed.add(arch)
                self._tick()
            raise ApiError(
                409, f"{arch} is not disabled (nothing changed): {row.state}: {row.error}"
            )
        return wire.ArchChange(arch, str(row.state))

    # ------------------------------------------------------------ reload

    def _reload(self) -> wire.ReloadResult:
        """Re-read the configuration; on any problem keep running on the old one and say so."""
        self.reload_requested = False
        self.notifier.reloading()
        try:
            new = config.load(self.config_path, require_safe_mode=self.safe_mode)
            if self.sandbox is not None:
                new = config.for_sandbox(new, self.sandbox.runtime, self.sandbox.state)
        except config.ConfigError as exc:
            self.log.error("reload_failed", error=str(exc), keeping=self.cfg.config_file)
            self.notifier.ready(f"reload failed, running on the old configuration: {exc}")
            self._reload_warning = (
                f"the last reload was refused, binfmtd runs on the configuration it had "
                f"before: {exc}"
            )
            self._publish()
            raise ApiError(
                422, f"reload failed, still running on the old configuration: {exc}"
            ) from None
        changed = _changed_keys(self.cfg, new)
        later = [k for k in changed if k in RESTART_KEYS]
        changed = [k for k in changed if k not in later]
        # What only a restart can change keeps its running value, so status stays true.
        new = dataclasses.replace(new, **{k: getattr(self.cfg, k) for k in later})
        self._reload_warning = (
            f"changed in the configuration but kept at their running values until binfmtd "
            f"restarts: {', '.join(later)}"
            if later
            else None
        )
        self.cfg = new
        self.engine.apply_config(new)
        if "buildkit" in changed:
            if self.worker is not None:
                self.worker.stop()
                self.worker = None
            self._start_worker()
        self._tick()
        self.log.info("config_reloaded", changed=changed, needs_restart=later)
        if later:
            self.log.warning(
                "config_needs_restart",
                keys=later,
                hint="these keys keep their running values until "
                + (
                    f"binfmtd --sandbox={self.sandbox.name} is restarted"
                    if self.sandbox
                    else "`systemctl restart binfmtd`"
                ),
            )
        self.notifier.ready(self._summary())
        return wire.ReloadResult(True, tuple(changed), tuple(later))

    # ------------------------------------------------------------ parts

    def _start_server(self) -> None:
        from binfmtd.server import ApiServer

        self._start_metrics_port()  # first: the status a first client reads carries its warning
        self.server = ApiServer(
            self.cfg.api.socket,
            self.cfg.api.group,
            DaemonApi(self),
            observe=self.metrics.observe_request,
        )
        self.server.start()

    def _start_metrics_port(self) -> None:
        port = self.cfg.api.metrics_port
        if port is not None:
            try:
                self.metrics.serve_tcp(port)
                self.log.info("metrics_listening", address=f"127.0.0.1:{port}")
            except OSError as exc:  # the socket API still serves /metrics
                self.log.error("metrics_listen_failed", port=port, error=exc.strerror)
                self._metrics_warning = (
                    f"metrics are not served on 127.0.0.1:{port} (api.metrics_port): "
                    f"{exc.strerror}; GET /metrics on the API socket still works"
                )
                self._publish()

    def _start_worker(self) -> None:
        if not self.cfg.buildkit.enabled:
            return
        from binfmtd.worker import WorkerSupervisor

        self.worker = WorkerSupervisor(
            self.cfg.buildkit, clock=time.monotonic, logger=log.get("binfmtd.worker")
        )
        self.worker.reap_orphan()


class DaemonApi:
    """What the API server may ask of the daemon: snapshots, and queued mutations."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def version(self) -> int:
        """Changes whenever any published view changes."""
        return self.daemon.published.version

    def status(self) -> wire.StatusRecord:
        """The full status, from memory."""
        return self.daemon.published.status

    def platforms(self) -> wire.PlatformsRecord:
        """Verified platforms, native first."""
        return self.daemon.published.platforms

    def platforms_binfmt(self) -> wire.BinfmtRecord:
        """The JSON shape tonistiigi/binfmt prints."""
        return self.daemon.published.binfmt

    def worker(self) -> wire.WorkerRecord:
        """The BuildKit worker's state."""
        return self.daemon.published.worker or wire.WorkerRecord(enabled=False)

    def metrics(self) -> bytes:
        """The Prometheus text exposition."""
        return self.daemon.metrics.render()

    def health(self) -> wire.HealthRecord:
        """Liveness: ready, and how long since the loop last published."""
        published = self.daemon.published
        age = time.monotonic() - published.last_tick if published.last_tick else -1.0
        limit = max(5.0, 3 * self.daemon.cfg.reconcile_interval_s)
        return wire.HealthRecord(
            published.ready and 0 <= age < limit, published.ready, round(age, 3)
        )

    def mutate(self, action: str, arg: dict[str, Any]) -> wire.Record:
        """Queue a mutation to the loop thread and wait for the answer."""
        return self.daemon.submit(action, arg)


def _changed_keys(old: config.Config, new: config.Config) -> list[str]:
    return [
        f.name
        for f in dataclasses.fields(old)
        if f.name != "config_file" and getattr(old, f.name) != getattr(new, f.name)
    ]


def _preload(modules: tuple[str, ...]) -> threading.Thread:
    """Import `modules` on a thread while the first pass runs: that pass mostly waits for its
    probes (another process, on another CPU), and the API server's modules (h11, the routes:
    ~15 ms) then load in that wait instead of between the pass and READY=1. A module that
    fails to import here is imported again (and raises) where it is used."""

    def load() -> None:
        for name in modules:
            with contextlib.suppress(Exception):
                importlib.import_module(name)

    thread = threading.Thread(target=load, name="binfmtd-preload", daemon=True)
    thread.start()
    return thread


def _needs_safe_mode() -> bool:
    from binfmtd import ns

    return os.geteuid() == 0 and not ns.in_user_namespace()


def serve(
    cfg: config.Config,
    *,
    sandbox: ns.SandboxDirs | None,
    config_path: str | None,
    safe_mode: bool | None = None,
) -> int:
    """Run the daemon until SIGTERM (`safe_mode`: reloads apply the trust rule, as at start)."""
    lock = Lock(cfg.lock_file, cfg.install_dir, sandbox=sandbox.name if sandbox else None)
    lock.acquire()
    try:
        packages = headstart.begin(cfg)  # a first start's package lookup runs during set-up
        daemon = Daemon(
            cfg, sandbox=sandbox, config_path=config_path, safe_mode=safe_mode, packages=packages
        )
        return daemon.run()
    finally:
        lock.release()
