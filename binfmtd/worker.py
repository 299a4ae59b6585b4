"""Drives a real buildkitd process from the pure lifecycle in `binfmtd.supervision`.

`WorkerSupervisor.tick()` is non-blocking (one ListWorkers call at most, with a short timeout):
it reaps the child, checks health every `health_interval_s`, feeds the events to `step()` and
carries out the actions. Proofs through the worker (`binfmtd.proof`) run in a thread and come
back as events on the next tick. `stop()` blocks for at most `grace_s` plus the SIGKILL. The
status is an immutable value replaced whole, so `snapshot()` may be read from another thread.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import tomllib
from collections import deque
from collections.abc import Callable, Collection, Sequence
from typing import IO, Any

import psutil
import structlog
from structlog.typing import FilteringBoundLogger

from binfmtd import trust, wire
from binfmtd.buildkit import (
    WorkerUnreachable,
    buildx_append_command,
    buildx_command,
    list_workers,
    normalize_platform,
    platform_diff,
    render_config,
)
from binfmtd.config import BuildkitConfig
from binfmtd.proof import prove_platforms
from binfmtd.run import SAFE_PATH, minimal_env
from binfmtd.supervision import (
    Action,
    Event,
    Exited,
    Healthy,
    Kill,
    PlatformsChanged,
    ProofFinished,
    ProofResult,
    Prove,
    ResetRequested,
    RestartRequested,
    Spawn,
    SpawnFailed,
    Started,
    StopCause,
    StopRequested,
    SupervisorPolicy,
    Terminate,
    Tick,
    Unhealthy,
    WorkerState,
    WorkerStatus,
    step,
)

STARTING_HEALTH_INTERVAL_S = 0.2
READER_JOIN_S = 0.5  # a grandchild holding the pipe open must not stall the loop
TAIL_LINES = 20  # buildkitd's last output lines, shown when it fails


def policy_of(config: BuildkitConfig) -> SupervisorPolicy:
    """The lifecycle limits named in the configuration."""
    return SupervisorPolicy(
        start_timeout_s=config.start_timeout_s,
        backoff_initial_s=config.backoff_initial_s,
        backoff_max_s=config.backoff_max_s,
        max_failures=config.max_failures,
        debounce_s=config.debounce_s,
        grace_s=config.grace_s,
        stable_s=config.stable_s,
    )


def resolve_binary(path: str) -> str | None:
    """An executable path for `path`: as given if it has a slash, else looked up in SAFE_PATH."""
    if "/" not in path:
        return shutil.which(path, path=SAFE_PATH)
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


def buildkitd_argv(binary: str, config: BuildkitConfig, gid: int | None) -> list[str]:
    """The buildkitd command line; `root` and the platforms travel in the TOML.

    With `tcp_address`, a second listener that accepts only clients with a certificate signed
    by `tls_ca` (buildkitd's own mutual TLS: --tlscacert/--tlscert/--tlskey).
    """
    argv = [binary, "--config", config.config_path, "--addr", f"unix://{config.socket}"]
    if config.tcp_address:
        argv += ["--addr", f"tcp://{config.tcp_address}"]
        argv += ["--tlscacert", str(config.tls_ca), "--tlscert", str(config.tls_cert)]
        argv += ["--tlskey", str(config.tls_key)]
    if gid is not None:
        argv += ["--group", str(gid)]
    return argv + list(config.extra_args)


def buildkitd_env(config: BuildkitConfig) -> dict[str, str]:
    """buildkitd's environment: the minimal one, and runc's state under `run_dir`.

    runc keeps its state in $XDG_RUNTIME_DIR/runc when it runs as root of a user namespace
    (`--sandbox`) and in /run/runc otherwise (the unit binds that into its RuntimeDirectory).
    """
    return minimal_env({"XDG_RUNTIME_DIR": config.run_dir})


def write_atomic(path: str, text: str, mode: int = 0o644) -> None:
    """Replace `path` with `text` so readers see the old or the new file, never a torn one."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_trusted(path: str, what: str, max_bytes: int = 1 << 20) -> bytes:
    """The bytes of a file root's buildkitd will use (base config, TLS certificate or key).

    Only under the trust rule (`binfmtd.trust`: root-owned, not writable by group/others along
    the whole path, checked and read on one descriptor). Raises ValueError naming `what`, the
    file and the fix.
    """
    try:
        return trust.read_file(path, max_bytes=max_bytes, symlinks=True)
    except trust.TrustError as exc:
        raise ValueError(f"refusing buildkit {what} {path}: {exc}") from None
    except OSError as exc:
        raise ValueError(f"cannot read buildkit {what} {path}: {exc.strerror}") from None


def check_tls_files(config: BuildkitConfig) -> None:
    """The TCP listener's CA, certificate and key pass the trust rule; the key is private.

    buildkitd reads them itself (by path) when it starts, right after this check; the trust
    rule makes sure only root could change them in between. Raises ValueError with the fix.
    """
    if not config.tcp_address:
        return
    for what in ("tls_ca", "tls_cert", "tls_key"):
        read_trusted(str(getattr(config, what)), what)
    mode = os.stat(str(config.tls_key)).st_mode
    if mode & 0o077:
        raise ValueError(
            f"refusing buildkit tls_key {config.tls_key}: readable by group or others "
            f"(mode {mode & 0o777:o}); run: chmod 600 {config.tls_key}"
        )


RUNTIME_FLAG = "--oci-worker-binary"


def oci_runtime(base: dict[str, Any], extra_args: Sequence[str]) -> str:
    """The absolute path of the OCI runtime buildkitd's worker will run, checked by the trust
    rule: root's buildkitd runs it for every RUN step, with the user's build inside.

    Named by `--oci-worker-binary` in `extra_args` (the flag wins in buildkitd), else by the
    base config's `[worker.oci] binary`, else `runc`; a bare name is looked up in SAFE_PATH.
    Raises ValueError with the remedy when it is missing or fails the trust rule.
    """
    worker = base.get("worker")
    oci = worker.get("oci") if isinstance(worker, dict) else None
    name = str((oci.get("binary") if isinstance(oci, dict) else None) or "runc")
    for i, arg in enumerate(extra_args):
        if arg.startswith(RUNTIME_FLAG + "="):
            name = arg.split("=", 1)[1]
        elif arg == RUNTIME_FLAG and i + 1 < len(extra_args):
            name = extra_args[i + 1]
    path = resolve_binary(name)
    if path is None:
        raise ValueError(
            f"OCI runtime {name!r} not found (PATH searched: {SAFE_PATH}); "
            "the BuildKit worker needs it: apt-get install runc"
        )
    try:
        os.close(trust.open_file(path, symlinks=True))
    except trust.TrustError as exc:
        raise ValueError(f"refusing OCI runtime {path}: {exc}") from None
    except OSError as exc:
        raise ValueError(f"cannot open OCI runtime {path}: {exc.strerror}") from None
    return os.path.realpath(path)


def load_base_config(path: str | None) -> dict[str, Any]:
    """The user's buildkitd.toml to merge ours into; a readable error names the file.

    Its keys reach root's buildkitd (entitlements, grpc uid, worker binary), so it must pass
    the trust rule like everything else root reads.
    """
    if path is None:
        return {}
    raw = read_trusted(path, "base_config")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"buildkit base_config {path} is not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"buildkit base_config {path} is not valid TOML: {exc}") from exc


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _forward_lines(
    stream: IO[bytes], name: str, pid: int, log: FilteringBoundLogger, tail: deque[str]
) -> None:
    """Copy the child's output into the log (one `worker_output` event per line) and `tail`."""
    with stream:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            if line:
                tail.append(line)
                log.info("worker_output", stream=name, pid=pid, line=line)


class WorkerSupervisor:
    """One buildkitd child, kept in line with the verified platform set.

    `clock` must be the clock the daemon passes to `tick()` as `now` (time.monotonic by default);
    `stop()`, `reset()` and `snapshot()` read it themselves.
    """

    def __init__(
        self,
        config: BuildkitConfig,
        clock: Callable[[], float] = time.monotonic,
        logger: FilteringBoundLogger | None = None,
        *,
        name: str = "binfmtd",
    ) -> None:
        self._config = config
        self._policy = policy_of(config)
        self._clock = clock
        self._log: FilteringBoundLogger = logger or structlog.get_logger("binfmtd.worker")
        self._name = name
        self._status = WorkerStatus()
        self._proc: subprocess.Popen[bytes] | None = None
        self._readers: tuple[threading.Thread, ...] = ()
        self._last_health: float | None = None
        self._proofs: queue.SimpleQueue[ProofFinished] = queue.SimpleQueue()
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._binary: str | None = None

    @property
    def status(self) -> WorkerStatus:
        """The current lifecycle status."""
        return self._status

    # --- the loop ------------------------------------------------------------------------------

    def tick(self, now: float, desired_platforms: tuple[str, ...]) -> None:
        """Advance the lifecycle: follow `desired_platforms`, reap, health-check, act."""
        desired = tuple(sorted({normalize_platform(p) for p in desired_platforms}))
        if desired != self._status.desired_platforms:
            self._feed(PlatformsChanged(desired), now)
        while not self._proofs.empty():
            self._feed(self._proofs.get_nowait(), now)
        self._reap(now)
        self._check_health(now)
        self._feed(Tick(), now)

    def stop(self) -> None:
        """SIGTERM, up to `grace_s` for running builds, then SIGKILL; returns once it is gone."""
        self._reap(self._clock())
        self._feed(StopRequested(), self._clock())
        proc = self._proc
        if proc is not None:
            try:
                proc.wait(timeout=self._config.grace_s)
            except subprocess.TimeoutExpired:
                self._apply(Kill(), self._clock())
                proc.wait()
        self._reap(self._clock())
        _remove(self.pidfile)  # a stale pid must never name another process later

    def reset(self) -> None:
        """Leave FATAL and forget failures (on config reload)."""
        self._feed(ResetRequested(), self._clock())

    def restart(self) -> None:
        """Restart a running worker, with the usual grace for running builds."""
        self._feed(RestartRequested(), self._clock())

    def snapshot(self, verified: Collection[str] | None = None) -> wire.WorkerRecord:
        """The worker as the status API and `binfmtctl worker` show it (`wire.WorkerRecord`).

        One `platforms` row per platform asked for or advertised, with its proof; `offered` are
        the platforms buildx may use: advertised, proven and not withdrawn by the daemon since
        the worker started. `verified` is the daemon's verified set right now, when the
        supervisor has not been ticked with it yet (a platform leaves the offer at once).
        The `buildx_*` lines appear only while the worker runs; `output_tail` holds
        buildkitd's last lines when it is failing.
        """
        status, now = self._status, self._clock()
        advertised = status.advertised_platforms
        diff = platform_diff(status.servable, advertised) if advertised else None
        running = status.state is WorkerState.RUNNING
        # A platform the daemon withdrew (an arch disabled or no longer verified) leaves the
        # offer at once, before the debounced restart takes it off buildkitd's list.
        current = status.desired_platforms
        if verified is not None:
            current = tuple(normalize_platform(p) for p in verified)
        withdrawn = set(status.running_platforms) - set(current)
        offered = (
            tuple(p for p in advertised if p in status.proven and p not in withdrawn)
            if running
            else ()
        )
        failing = status.state in _ALARMING or (status.last_error is not None and not running)
        return wire.WorkerRecord(
            enabled=True,
            state=status.state.value,
            pid=status.pid,
            binary=self._binary or self._config.path,
            uptime_s=None if status.healthy_at is None else round(now - status.healthy_at, 1),
            restarts=status.restarts,
            failures=status.failures,
            intended_platforms=tuple(status.desired_platforms),
            running_platforms=tuple(status.running_platforms) if status.pid else (),
            advertised_platforms=tuple(advertised),
            offered_platforms=offered,
            refused_platforms=dict(status.refused),
            platforms=platform_rows(status),
            differences=None if diff is None else diff.as_dict(),
            next_start_in_s=_seconds_until(status.next_start_at, now),
            last_error=status.last_error,
            output_tail=tuple(self._tail) if failing else (),
            socket=self._config.socket,
            tcp_address=self._config.tcp_address,
            buildx_command=buildx_command(self._name, self._config.socket) if running else None,
            buildx_append_command=self._append_line(list(offered)) if running else None,
        )

    def _append_line(self, offered: list[str]) -> str | None:
        address = self._config.tcp_address
        return buildx_append_command(self._name, address, offered) if address else None

    # --- events in -----------------------------------------------------------------------------

    def _feed(self, event: Event, now: float) -> None:
        before = self._status
        self._status, actions = step(before, event, now, self._policy)
        if self._status.state is WorkerState.RUNNING and before.state is not WorkerState.RUNNING:
            self._record_identity()  # a wrapper script has exec'd the real buildkitd by now
        self._log_change(before, self._status, now)
        for action in actions:
            follow_up = self._apply(action, now)
            if follow_up is not None:
                self._feed(follow_up, now)

    def _reap(self, now: float) -> None:
        proc = self._proc
        if proc is None or proc.poll() is None:
            return
        self._proc = None
        for reader in self._readers:
            reader.join(READER_JOIN_S)
        self._readers = ()
        _remove(self._config.socket)
        _remove(self.pidfile)
        # buildkitd exits 1 after SIGTERM too: a stop we asked for is not a failure.
        cause = self._status.stop_cause
        stopping = self._status.state is WorkerState.STOPPING and cause in _ASKED
        log = self._log.info if stopping else self._log.warning
        log("worker_exited", pid=proc.pid, returncode=proc.returncode, requested=stopping)
        self._feed(Exited(proc.returncode), now)

    def _check_health(self, now: float) -> None:
        status = self._status
        if status.pid is None or status.state not in (WorkerState.STARTING, WorkerState.RUNNING):
            return
        interval = self._config.health_interval_s
        if status.state is WorkerState.STARTING:
            interval = min(interval, STARTING_HEALTH_INTERVAL_S)
            if not os.path.exists(self._config.socket):
                return
        if self._last_health is not None and now - self._last_health < interval:
            return
        self._last_health = now
        self._feed(self._probe(), now)

    def _probe(self) -> Event:
        timeout = max(0.5, min(2.0, self._config.health_interval_s))
        try:
            records = list_workers(self._config.socket, timeout)
        except WorkerUnreachable as exc:
            return Unhealthy(str(exc))
        platforms = dict.fromkeys(p for record in records for p in record.platforms)
        return Healthy(tuple(platforms))

    # --- actions out ---------------------------------------------------------------------------

    def _apply(self, action: Action, now: float) -> Event | None:
        match action:
            case Spawn(platforms):
                return self._spawn(platforms)
            case Terminate(grace_s):
                self._signal(signal.SIGTERM, group=False, grace_s=grace_s)
            case Kill():
                self._signal(signal.SIGKILL, group=True)
            case Prove(pid, platforms):
                self._start_proof(pid, platforms, now)
        return None

    def _start_proof(self, pid: int, platforms: tuple[str, ...], now: float) -> None:
        """Prove `platforms` in a thread; the results come back through `tick()`."""
        spawned_at = self._status.started_at

        def landed(result: ProofResult) -> None:
            self._log_result(pid, result, spawned_at)
            self._proofs.put(ProofFinished(pid, (result,)))

        def prove() -> None:
            started = time.monotonic()
            config = self._config
            results = prove_platforms(
                config.socket, platforms, config.proof_timeout_s, on_result=landed
            )
            self._log.info(
                "worker_proof_finished",
                pid=pid,
                proven=sum(r.ok for r in results),
                of=len(results),
                duration_ms=round((time.monotonic() - started) * 1000, 1),
                since_spawn_s=_since(spawned_at),
            )

        threading.Thread(target=prove, name="buildkit-proof", daemon=True).start()
        self._log.info("worker_proof_started", pid=pid, platforms=list(platforms))

    def _log_result(self, pid: int, result: ProofResult, spawned_at: float | None) -> None:
        since = _since(spawned_at)
        if result.ok:
            self._log.info(
                "worker_platform_proven", pid=pid, platform=result.platform, since_spawn_s=since
            )
            return
        event = "worker_platform_refused" if result.conclusive else "worker_proof_no_verdict"
        self._log.warning(event, pid=pid, platform=result.platform, error=result.error)

    def _signal(self, signum: signal.Signals, *, group: bool, **keys: Any) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            # The child leads its own process group, so its pid is the group id; while it is
            # unreaped that id cannot be reused.
            if group:
                os.killpg(proc.pid, signum)
            else:
                os.kill(proc.pid, signum)
        self._log.info("worker_signalled", pid=proc.pid, signal=signum.name, **keys)

    def _spawn(self, platforms: tuple[str, ...]) -> Event:
        config = self._config
        binary = resolve_binary(config.path)
        if binary is None:
            error = (
                f"buildkitd not found: {config.path!r} is not an executable"
                f" (PATH searched: {SAFE_PATH}); install BuildKit or set buildkit.path"
            )
            return SpawnFailed(error, permanent=True)
        try:  # root runs it: the binary and every directory above it pass the trust rule
            os.close(trust.open_file(binary, symlinks=True))
        except trust.TrustError as exc:
            return SpawnFailed(f"refusing to run buildkitd {binary}: {exc}", permanent=True)
        except OSError as exc:
            return SpawnFailed(f"cannot run {binary}: {exc.strerror}", permanent=True)
        try:
            self._prepare(platforms)
        except (OSError, ValueError) as exc:
            return SpawnFailed(f"cannot prepare buildkitd: {exc}", permanent=True)
        self._binary = binary
        argv = buildkitd_argv(binary, config, self._socket_gid())
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=buildkitd_env(config),
                close_fds=True,
                process_group=0,
            )
        except OSError as exc:
            permanent = isinstance(exc, FileNotFoundError | PermissionError)
            return SpawnFailed(f"cannot run {binary}: {exc.strerror}", permanent=permanent)
        self._adopt(proc)
        self._record_identity()
        self._log.info("worker_spawned", pid=proc.pid, argv=argv, platforms=list(platforms))
        return Started(proc.pid)

    @property
    def pidfile(self) -> str:
        """Where the running worker's pid is kept, so a restarted daemon can reap an orphan."""
        return os.path.join(self._config.state_dir, "buildkitd.binfmtd.pid")

    def _record_identity(self) -> None:
        """Write the pidfile: pid, start time and executable of our worker, to reap it safely."""
        if self._proc is None:
            return
        identity = _identity(self._proc.pid)
        if identity is not None:
            with contextlib.suppress(OSError):
                write_atomic(self.pidfile, json.dumps(identity) + "\n", mode=0o600)

    def reap_orphan(self) -> int | None:
        """Stop a worker left running by a daemon that died (kill -9, OOM): it holds the lock.

        Only the very process the pidfile records is touched: same pid, same start time, same
        executable (a reused pid, or a client whose argv names our socket, never matches). The
        pidfile is read under the trust rule and removed afterwards either way.
        """
        recorded = _read_pidfile(self.pidfile)
        if recorded is None:
            _remove(self.pidfile)
            return None
        _remove(self.pidfile)
        pid = int(recorded["pid"])
        if _identity(pid) != recorded:
            self._log.info("worker_pidfile_stale", pid=pid, recorded=recorded)
            return None
        try:
            proc = psutil.Process(pid)
            proc.terminate()
            try:
                proc.wait(timeout=self._config.grace_s)
            except psutil.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None
        self._log.warning("worker_orphan_reaped", pid=pid, exe=recorded["exe"])
        return pid

    def _prepare(self, platforms: tuple[str, ...]) -> None:
        config = self._config
        base = load_base_config(config.base_config)
        check_tls_files(config)
        os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
        os.makedirs(os.path.dirname(config.socket) or ".", exist_ok=True)
        os.makedirs(config.run_dir, mode=0o711, exist_ok=True)
        text = render_config(
            base,
            platforms,
            containerd=config.containerd_worker,
            root=config.state_dir,
            run_dir=config.run_dir,
            runtime=oci_runtime(base, config.extra_args),
        )
        write_atomic(config.config_path, text)
        _remove(config.socket)

    def _adopt(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        self._last_health = None
        self._tail.clear()
        streams = (("stdout", proc.stdout), ("stderr", proc.stderr))
        self._readers = tuple(
            threading.Thread(
                target=_forward_lines,
                args=(stream, name, proc.pid, self._log, self._tail),
                name=f"buildkitd-{name}",
                daemon=True,
            )
            for name, stream in streams
            if stream is not None
        )
        for reader in self._readers:
            reader.start()

    def _socket_gid(self) -> int | None:
        group = self._config.socket_group
        if group is None:
            return None
        if group.isdigit():
            return int(group)
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            self._log.warning("socket_group_missing", group=group, socket=self._config.socket)
            return None

    # --- logging -------------------------------------------------------------------------------

    def _log_change(self, before: WorkerStatus, after: WorkerStatus, now: float) -> None:
        if before.state is not after.state:
            level = self._log.warning if after.state in _ALARMING else self._log.info
            level(
                "worker_state_changed",
                previous=before.state.value,
                state=after.state.value,
                pid=after.pid if after.pid is not None else before.pid,
                failures=after.failures,
                retry_in_s=_seconds_until(after.next_start_at, now),
                last_error=after.last_error,
            )
        elif after.last_error != before.last_error and after.last_error is not None:
            self._log.warning(
                "worker_check_failed", state=after.state.value, error=after.last_error
            )


_ALARMING = frozenset({WorkerState.BACKOFF, WorkerState.FATAL})
_ASKED = frozenset({StopCause.REQUESTED, StopCause.RESTART, StopCause.REFUSED})


def _since(moment: float | None) -> float | None:
    """Seconds from `moment` (time.monotonic) to now, for log events."""
    return None if moment is None else round(time.monotonic() - moment, 3)


def _seconds_until(moment: float | None, now: float) -> float | None:
    return None if moment is None else round(max(moment - now, 0.0), 1)


def _identity(pid: int) -> dict[str, Any] | None:
    """What identifies a process beyond its (reusable) pid: start time and executable."""
    try:
        proc = psutil.Process(pid)
        return {"pid": pid, "start_time": proc.create_time(), "exe": proc.exe()}
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
        return None


def _read_pidfile(path: str) -> dict[str, Any] | None:
    """The recorded identity; None when missing, untrusted, or in an older format (bare pid)."""
    try:
        record = json.loads(trust.read_file(path, max_bytes=4096))
    except (OSError, ValueError, trust.TrustError):
        return None
    keys = {"pid": int, "start_time": float, "exe": str}
    if not isinstance(record, dict) or set(record) != set(keys):
        return None
    if not all(
        isinstance(record[k], t) and not isinstance(record[k], bool) for k, t in keys.items()
    ):
        return None
    return record


def platform_rows(status: WorkerStatus) -> tuple[wire.WorkerPlatformRecord, ...]:
    """One row per platform asked for or advertised: its source, its proof and the reason."""
    desired = set(status.desired_platforms)
    refused, unproven = dict(status.refused), dict(status.unproven)
    names = sorted({*status.desired_platforms, *status.advertised_platforms, *refused})
    return tuple(_row(p, p in desired, status, refused, unproven) for p in names)


def _row(
    platform: str,
    verified: bool,
    status: WorkerStatus,
    refused: dict[str, str],
    unproven: dict[str, str],
) -> wire.WorkerPlatformRecord:
    proof, reason = "pending", None
    if platform in refused:
        proof, reason = "refused", refused[platform]
    elif platform in status.proven:
        proof = "proven"
    elif platform in status.proving:
        proof = "proving"
    elif platform in unproven:
        proof, reason = "unproven", unproven[platform]
    source = "verified" if verified else "buildkit"
    return wire.WorkerPlatformRecord(platform, source, proof, reason)
