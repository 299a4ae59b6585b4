"""The BuildKit worker lifecycle as a pure state machine, in the manner of Supervisor.

`step(status, event, now, policy)` returns the next status and the actions the I/O shell must
carry out (spawn, SIGTERM, SIGKILL). Nothing here reads a clock, a process or a socket: time
arrives as `now`, process facts arrive as events, so every rule is table-tested.

Rules:
- A change of the desired platform set takes effect once it has been stable for `debounce_s`;
  then a running worker is restarted so the served set follows the verified set. An empty set
  keeps the worker stopped (fail closed: BuildKit would otherwise auto-detect emulators).
- A stop sends SIGTERM and gives running builds `grace_s` before SIGKILL.
- An exit or crash, a spawn error, or no healthy answer within `start_timeout_s` is a failure:
  BACKOFF for `backoff_initial_s * 2**(n-1)` capped at `backoff_max_s`, FATAL after
  `max_failures` consecutive failures. FATAL holds until `ResetRequested` (config reload).
- Healthy for `stable_s` in a row clears the failure count.
- Proof through the worker: once ListWorkers answers, every advertised platform not proven yet
  is proven by a real RUN step (`Prove`); results may arrive one by one. A platform BuildKit
  refuses is kept out of the worker's configuration (with BuildKit's error) and, once every
  running proof has answered, a worker serving it is restarted once without the refused ones,
  after a backoff delay; the refusal holds until that platform leaves the verified set or a
  reset (config reload), so refusals never loop. A proof that got no answer (worker gone,
  timeout) refuses nothing and is retried with backoff.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum


class WorkerState(StrEnum):
    """Where the worker process is in its life."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    FATAL = "fatal"


class StopCause(StrEnum):
    """Why a STOPPING worker is stopping, which decides where its exit leads."""

    REQUESTED = "requested"
    RESTART = "restart"
    START_TIMEOUT = "start_timeout"
    REFUSED = "refused"


@dataclass(frozen=True)
class SupervisorPolicy:
    """The timing and retry limits of the lifecycle."""

    start_timeout_s: float = 30.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    max_failures: int = 5
    debounce_s: float = 2.0
    grace_s: float = 30.0
    stable_s: float = 60.0

    def backoff_delay(self, failures: int) -> float:
        """The wait before start number `failures + 1`: doubling from the initial delay, capped."""
        exponent = max(failures - 1, 0)
        return float(min(self.backoff_initial_s * 2**exponent, self.backoff_max_s))


@dataclass(frozen=True)
class WorkerStatus:
    """Everything the lifecycle knows; change it with `dataclasses.replace`."""

    state: WorkerState = WorkerState.STOPPED
    wanted: bool = True
    pid: int | None = None
    started_at: float | None = None
    healthy_at: float | None = None
    failures: int = 0
    restarts: int = 0
    desired_platforms: tuple[str, ...] = ()
    desired_since: float | None = None
    running_platforms: tuple[str, ...] = ()
    advertised_platforms: tuple[str, ...] = ()
    next_start_at: float | None = None
    deadline: float | None = None
    stop_cause: StopCause | None = None
    last_error: str | None = None
    proven: tuple[str, ...] = ()
    proving: tuple[str, ...] = ()
    unproven: tuple[tuple[str, str], ...] = ()
    refused: tuple[tuple[str, str], ...] = ()
    proof_due_at: float | None = None
    proof_retries: int = 0
    refusal_restarts: int = 0

    @property
    def servable(self) -> tuple[str, ...]:
        """The desired platforms the worker has not refused: what its configuration lists."""
        refused = dict(self.refused)
        return tuple(p for p in self.desired_platforms if p not in refused)


@dataclass(frozen=True)
class ProofResult:
    """One platform's RUN step through the worker.

    `conclusive` is False when the worker gave no verdict (it went away, or the call failed
    before BuildKit ran the step); such a result refuses nothing.
    """

    platform: str
    ok: bool
    error: str | None = None
    conclusive: bool = True


# --- events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tick:
    """Time passed; deadlines, debounce and backoff are judged against `now`."""


@dataclass(frozen=True)
class PlatformsChanged:
    """The verified platform set is now `platforms`."""

    platforms: tuple[str, ...]


@dataclass(frozen=True)
class Started:
    """The spawned process exists with this pid."""

    pid: int


@dataclass(frozen=True)
class SpawnFailed:
    """The process could not be spawned; `permanent` when retrying cannot help (no binary)."""

    error: str
    permanent: bool = False


@dataclass(frozen=True)
class Healthy:
    """ListWorkers answered with these platforms."""

    platforms: tuple[str, ...]


@dataclass(frozen=True)
class Unhealthy:
    """ListWorkers did not answer."""

    error: str


@dataclass(frozen=True)
class Exited:
    """The process ended with this return code (negative: killed by that signal)."""

    code: int


@dataclass(frozen=True)
class ProofFinished:
    """The proofs started for the process `pid` ended with these results."""

    pid: int
    results: tuple[ProofResult, ...]


@dataclass(frozen=True)
class StopRequested:
    """Stop the worker and keep it stopped."""


@dataclass(frozen=True)
class RestartRequested:
    """Restart a running worker (its configuration changed)."""


@dataclass(frozen=True)
class ResetRequested:
    """Forget failures, leave FATAL and want the worker running again (config reload)."""


Event = (
    Tick
    | PlatformsChanged
    | Started
    | SpawnFailed
    | Healthy
    | Unhealthy
    | Exited
    | ProofFinished
    | StopRequested
    | RestartRequested
    | ResetRequested
)


# --- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spawn:
    """Write the config for `platforms` and start buildkitd."""

    platforms: tuple[str, ...]


@dataclass(frozen=True)
class Terminate:
    """Send SIGTERM; the machine sends `Kill` itself once `grace_s` has passed."""

    grace_s: float


@dataclass(frozen=True)
class Kill:
    """Send SIGKILL to the worker's process group."""


@dataclass(frozen=True)
class Prove:
    """Run each platform's probe as a RUN step through the worker; answer with ProofFinished."""

    pid: int
    platforms: tuple[str, ...]


Action = Spawn | Terminate | Kill | Prove
Step = tuple[WorkerStatus, tuple[Action, ...]]


# --- transitions -------------------------------------------------------------------------------


def describe_exit(code: int) -> str:
    """A readable account of a return code."""
    return f"killed by signal {-code}" if code < 0 else f"exited with code {code}"


def _settled(status: WorkerStatus, now: float, policy: SupervisorPolicy) -> bool:
    since = status.desired_since
    return since is None or now - since >= policy.debounce_s


def _spawn(status: WorkerStatus, now: float, policy: SupervisorPolicy) -> Step:
    platforms = status.servable
    new = replace(
        status,
        state=WorkerState.STARTING,
        pid=None,
        started_at=now,
        healthy_at=None,
        restarts=status.restarts + int(status.started_at is not None),
        running_platforms=platforms,
        advertised_platforms=(),
        next_start_at=None,
        deadline=now + policy.start_timeout_s,
        stop_cause=None,
        proven=(),
        proving=(),
        unproven=(),
        proof_due_at=None,
        proof_retries=0,
    )
    return new, (Spawn(platforms),)


def _gone(status: WorkerStatus, state: WorkerState) -> WorkerStatus:
    """`status` with no process left."""
    return replace(
        status,
        state=state,
        pid=None,
        healthy_at=None,
        advertised_platforms=(),
        deadline=None,
        stop_cause=None,
        proven=(),
        proving=(),
        unproven=(),
        proof_due_at=None,
    )


def _fail(status: WorkerStatus, error: str, now: float, policy: SupervisorPolicy) -> Step:
    failures = status.failures + 1
    down = replace(_gone(status, WorkerState.BACKOFF), failures=failures, last_error=error)
    if failures >= policy.max_failures:
        fatal = f"{error}; gave up after {failures} consecutive failures"
        return replace(down, state=WorkerState.FATAL, last_error=fatal), ()
    return replace(down, next_start_at=now + policy.backoff_delay(failures)), ()


def _stop(status: WorkerStatus, cause: StopCause, now: float, policy: SupervisorPolicy) -> Step:
    if status.pid is None:
        return _gone(status, WorkerState.STOPPED), ()
    stopping = replace(status, state=WorkerState.STOPPING, stop_cause=cause)
    if cause is StopCause.START_TIMEOUT:
        return replace(stopping, deadline=None), (Kill(),)
    deadline = now + policy.grace_s
    return replace(stopping, deadline=deadline), (Terminate(policy.grace_s),)


def _on_tick(status: WorkerStatus, now: float, policy: SupervisorPolicy) -> Step:
    state = status.state
    if state is WorkerState.STOPPED:
        return _tick_stopped(status, now, policy)
    if state is WorkerState.BACKOFF:
        return _tick_backoff(status, now, policy)
    if state is WorkerState.STARTING:
        return _tick_starting(status, now, policy)
    if state is WorkerState.RUNNING:
        return _tick_running(status, now, policy)
    if state is WorkerState.STOPPING and status.deadline is not None and now >= status.deadline:
        return replace(status, deadline=None), (Kill(),)
    return status, ()


def _tick_stopped(status: WorkerStatus, now: float, policy: SupervisorPolicy) -> Step:
    if status.wanted and status.servable and _settled(status, now, policy):
        return _spawn(status, now, policy)
    return status, ()


def _tick_backoff(status: WorkerStatus, now: float, policy: SupervisorPolicy) -> Step:
    if status.next_start_at is not None and now < status.next_start_at:
        return status, ()
    return _tick_stopped(
        replace(status, state=WorkerState.STOPPED, next_start_at=None), now, policy
    )


def _tick_starting(status: WorkerStatus, now: float, policy: SupervisorPolicy) -> Step:
    if status.deadline is None or now < status.deadline:
        return status, ()
    error = f"no healthy ListWorkers answer within {policy.start_timeout_s:g}s"
    if status.pid is None:
        return _fail(status, error, now, policy)
    stopping, actions = _stop(status, StopCause.START_TIMEOUT, now, policy)
    return replace(stopping, last_error=error), actions


def _tick_running(status: WorkerStatus, now: float, policy: SupervisorPolicy) -> Step:
    follows = status.running_platforms == status.servable
    # While proofs run, refusals gather: the worker restarts once, when the last result is in.
    if not follows and not status.proving and _settled(status, now, policy):
        return _stop(status, StopCause.RESTART, now, policy)
    stable = status.healthy_at is not None and now - status.healthy_at >= policy.stable_s
    if stable and (status.failures or status.refusal_restarts):
        return replace(status, failures=0, refusal_restarts=0), ()
    due = status.proof_due_at is not None and now >= status.proof_due_at
    if due and status.unproven and not status.proving:
        return _prove(status, tuple(p for p, _ in status.unproven))
    return status, ()


def _prove(status: WorkerStatus, platforms: tuple[str, ...]) -> Step:
    """Start proofs for `platforms` on the running process."""
    if not platforms or status.pid is None:
        return status, ()
    proving = tuple(sorted({*status.proving, *platforms}))
    return replace(status, proving=proving, proof_due_at=None), (Prove(status.pid, platforms),)


def _unjudged(status: WorkerStatus, advertised: tuple[str, ...]) -> tuple[str, ...]:
    """Advertised platforms with no proof yet, none running, and no refusal on record."""
    known = {*status.proven, *status.proving, *dict(status.unproven), *dict(status.refused)}
    return tuple(p for p in advertised if p not in known)


def _on_exit(status: WorkerStatus, code: int, now: float, policy: SupervisorPolicy) -> Step:
    state, cause = status.state, status.stop_cause
    if state in (WorkerState.STARTING, WorkerState.RUNNING):
        return _fail(status, f"buildkitd {describe_exit(code)}", now, policy)
    if state is not WorkerState.STOPPING:
        return status, ()
    if cause is StopCause.START_TIMEOUT:
        return _fail(status, status.last_error or "start timed out", now, policy)
    if cause is StopCause.RESTART and status.wanted:
        return _tick_stopped(_gone(status, WorkerState.STOPPED), now, policy)
    if cause is StopCause.REFUSED and status.wanted:
        if not status.servable:
            error = "every verified platform was refused by the worker (see each reason)"
            return replace(_gone(status, WorkerState.STOPPED), last_error=error), ()
        delay = policy.backoff_delay(status.refusal_restarts)
        return replace(_gone(status, WorkerState.BACKOFF), next_start_at=now + delay), ()
    return _gone(status, WorkerState.STOPPED), ()


def _on_platforms(status: WorkerStatus, platforms: tuple[str, ...], now: float) -> Step:
    wanted = tuple(sorted(set(platforms)))
    if wanted == status.desired_platforms:
        return status, ()
    # A platform that leaves the verified set loses its refusal: when it is verified again
    # (something changed), the worker gets to prove it afresh.
    refused = tuple((p, e) for p, e in status.refused if p in wanted)
    return replace(status, desired_platforms=wanted, desired_since=now, refused=refused), ()


def _on_started(status: WorkerStatus, pid: int) -> Step:
    if status.state is not WorkerState.STARTING:
        return status, ()
    return replace(status, pid=pid), ()


def _on_spawn_failed(
    status: WorkerStatus, event: SpawnFailed, now: float, policy: SupervisorPolicy
) -> Step:
    if status.state is not WorkerState.STARTING:
        return status, ()
    if event.permanent:
        return replace(_gone(status, WorkerState.FATAL), last_error=event.error), ()
    return _fail(status, event.error, now, policy)


def _on_healthy(status: WorkerStatus, platforms: tuple[str, ...], now: float) -> Step:
    if status.state is WorkerState.STARTING and status.pid is not None:
        status = replace(status, state=WorkerState.RUNNING, healthy_at=now, deadline=None)
    elif status.state is not WorkerState.RUNNING:
        return status, ()
    status = replace(status, advertised_platforms=platforms, last_error=None)
    return _prove(status, _unjudged(status, platforms))


def _on_proof(
    status: WorkerStatus, event: ProofFinished, now: float, policy: SupervisorPolicy
) -> Step:
    if status.state is not WorkerState.RUNNING or event.pid != status.pid:
        return status, ()
    done = {r.platform for r in event.results}
    proven = {*status.proven, *(r.platform for r in event.results if r.ok)}
    refused = dict(status.refused)
    refused.update({r.platform: r.error or "refused" for r in event.results if _refusal(r)})
    unproven = {p: e for p, e in status.unproven if p not in done}
    unproven.update({r.platform: r.error or "no verdict" for r in event.results if _no_verdict(r)})
    retries = status.proof_retries + int(bool(unproven))
    status = replace(
        status,
        proven=tuple(sorted(proven)),
        proving=tuple(p for p in status.proving if p not in done),
        unproven=tuple(sorted(unproven.items())),
        refused=tuple(sorted(refused.items())),
        proof_retries=retries,
        proof_due_at=now + policy.backoff_delay(retries) if unproven else None,
    )
    if not status.proving and any(p in refused for p in status.running_platforms):
        more = replace(status, refusal_restarts=status.refusal_restarts + 1)
        return _stop(more, StopCause.REFUSED, now, policy)
    return status, ()


def _refusal(result: ProofResult) -> bool:
    return not result.ok and result.conclusive


def _no_verdict(result: ProofResult) -> bool:
    return not result.ok and not result.conclusive


def _on_unhealthy(status: WorkerStatus, error: str) -> Step:
    if status.state in (WorkerState.STARTING, WorkerState.RUNNING):
        return replace(status, last_error=error), ()
    return status, ()


def _on_stop_requested(status: WorkerStatus, now: float, policy: SupervisorPolicy) -> Step:
    unwanted = replace(status, wanted=False)
    if status.state in (WorkerState.STARTING, WorkerState.RUNNING):
        return _stop(unwanted, StopCause.REQUESTED, now, policy)
    if status.state is WorkerState.STOPPING:
        return replace(unwanted, stop_cause=StopCause.REQUESTED), ()
    return replace(_gone(unwanted, WorkerState.STOPPED), next_start_at=None), ()


def _on_restart_requested(status: WorkerStatus, now: float, policy: SupervisorPolicy) -> Step:
    if status.state in (WorkerState.STARTING, WorkerState.RUNNING):
        return _stop(status, StopCause.RESTART, now, policy)
    return status, ()


def _on_reset(status: WorkerStatus, now: float, policy: SupervisorPolicy) -> Step:
    fresh = replace(
        status, wanted=True, failures=0, next_start_at=None, refused=(), refusal_restarts=0
    )
    if status.state in (WorkerState.FATAL, WorkerState.BACKOFF):
        return _tick_stopped(
            replace(_gone(fresh, WorkerState.STOPPED), last_error=None), now, policy
        )
    if status.state is WorkerState.STOPPING and status.stop_cause is StopCause.REQUESTED:
        return replace(fresh, stop_cause=StopCause.RESTART), ()
    if status.state is WorkerState.STOPPED:
        return _tick_stopped(fresh, now, policy)
    return fresh, ()


def step(status: WorkerStatus, event: Event, now: float, policy: SupervisorPolicy) -> Step:
    """The status after `event` at time `now`, and the actions the I/O shell must perform."""
    match event:
        case Tick():
            return _on_tick(status, now, policy)
        case PlatformsChanged(platforms):
            return _on_platforms(status, platforms, now)
        case Started(pid):
            return _on_started(status, pid)
        case SpawnFailed():
            return _on_spawn_failed(status, event, now, policy)
        case Healthy(platforms):
            return _on_healthy(status, platforms, now)
        case Unhealthy(error):
            return _on_unhealthy(status, error)
        case Exited(code):
            return _on_exit(status, code, now, policy)
        case ProofFinished():
            return _on_proof(status, event, now, policy)
        case StopRequested():
            return _on_stop_requested(status, now, policy)
        case RestartRequested():
            return _on_restart_requested(status, now, policy)
        case ResetRequested():
            return _on_reset(status, now, policy)
    raise AssertionError(f"unhandled event {event!r}")
