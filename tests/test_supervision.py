"""Table tests of the pure worker lifecycle: events in, status and actions out, no processes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    describe_exit,
    step,
)

POLICY = SupervisorPolicy(
    start_timeout_s=10.0,
    backoff_initial_s=1.0,
    backoff_max_s=8.0,
    max_failures=4,
    debounce_s=2.0,
    grace_s=5.0,
    stable_s=30.0,
)
A = ("linux/amd64", "linux/arm64")
OK = ProofResult
B = ("linux/amd64", "linux/arm64", "linux/riscv64")


def run(
    status: WorkerStatus, timeline: Sequence[tuple[float, Event]], *, proofs: bool = False
) -> tuple[WorkerStatus, list[Action]]:
    """Feed events at their times; return the final status and the actions emitted.

    `Prove` actions are left out unless `proofs` (the lifecycle tests do not care about them).
    """
    actions: list[Action] = []
    for now, event in timeline:
        status, emitted = step(status, event, now, POLICY)
        actions.extend(a for a in emitted if proofs or not isinstance(a, Prove))
    return status, actions


def running(
    platforms: tuple[str, ...] = A, *, at: float = 10.0, pid: int = 100, proven: bool = True
) -> WorkerStatus:
    """A worker that spawned at `at - 1`, answered healthy at `at` and (if `proven`) whose
    proofs all passed at `at`; otherwise its proofs are still running."""
    timeline: list[tuple[float, Event]] = [
        (at - 1 - POLICY.debounce_s, PlatformsChanged(platforms)),
        (at - 1, Tick()),
        (at - 1, Started(pid)),
        (at, Healthy(platforms)),
    ]
    if proven:
        timeline.append((at, ProofFinished(pid, tuple(OK(p, True) for p in platforms))))
    status, _ = run(WorkerStatus(), timeline)
    assert status.state is WorkerState.RUNNING
    return status


def crashed(times: int, *, start: float = 100.0) -> tuple[WorkerStatus, list[float]]:
    """A worker that exited right after each start, `times` times; returns the backoff delays."""
    status = running(at=start)
    delays: list[float] = []
    now = start
    for n in range(times):
        status, _ = step(status, Exited(1), now, POLICY)
        if status.state is not WorkerState.BACKOFF:
            break
        assert status.next_start_at is not None
        delays.append(status.next_start_at - now)
        now = status.next_start_at
        status, actions = step(status, Tick(), now, POLICY)
        assert actions == (Spawn(A),), f"restart {n} not spawned"
        status, _ = step(status, Started(200 + n), now, POLICY)
    return status, delays


# --- policy ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "delay"), [(0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 8.0), (30, 8.0)]
)
def test_backoff_delay_doubles_and_caps(failures: int, delay: float) -> None:
    """The backoff delay is initial * 2**(n-1), capped at backoff_max_s."""
    assert POLICY.backoff_delay(failures) == delay


@pytest.mark.parametrize(
    ("code", "text"), [(0, "exited with code 0"), (1, "exited with code 1"), (-9, "signal 9")]
)
def test_describe_exit_reads_well(code: int, text: str) -> None:
    """Return codes become readable text, signals included."""
    assert text in describe_exit(code)


# --- starting ----------------------------------------------------------------------------------


def test_stopped_without_platforms_never_spawns() -> None:
    """With no verified platform the worker stays stopped (fail closed)."""
    status, actions = run(WorkerStatus(), [(0.0, Tick()), (100.0, Tick())])
    assert status.state is WorkerState.STOPPED
    assert actions == []


@pytest.mark.parametrize(("tick_at", "spawned"), [(0.0, False), (1.9, False), (2.0, True)])
def test_first_spawn_waits_for_the_debounce(tick_at: float, spawned: bool) -> None:
    """The first start happens only once the platform set has been stable for debounce_s."""
    status, actions = run(WorkerStatus(), [(0.0, PlatformsChanged(A)), (tick_at, Tick())])
    assert (actions == [Spawn(A)]) is spawned
    assert status.state is (WorkerState.STARTING if spawned else WorkerState.STOPPED)


def test_repeated_identical_platforms_do_not_restart_the_debounce() -> None:
    """Reporting the same set again does not push the start further out."""
    status, actions = run(
        WorkerStatus(),
        [(0.0, PlatformsChanged(A)), (1.5, PlatformsChanged(tuple(reversed(A)))), (2.0, Tick())],
    )
    assert actions == [Spawn(A)]
    assert status.desired_since == 0.0


def test_spawn_records_start_and_deadline() -> None:
    """A spawn sets STARTING, the platforms it serves and the start deadline."""
    status, _ = run(WorkerStatus(), [(0.0, PlatformsChanged(A)), (2.0, Tick()), (2.0, Started(7))])
    assert (status.state, status.pid, status.started_at) == (WorkerState.STARTING, 7, 2.0)
    assert status.running_platforms == A
    assert status.deadline == 2.0 + POLICY.start_timeout_s
    assert status.restarts == 0


def test_healthy_answer_makes_it_running() -> None:
    """A ListWorkers answer while starting means RUNNING, with the advertised platforms kept."""
    status = running(A, at=10.0)
    assert status.healthy_at == 10.0
    assert status.advertised_platforms == A
    assert status.deadline is None
    assert status.last_error is None


def test_healthy_before_the_pid_is_known_is_ignored() -> None:
    """An answer cannot belong to a process we have not started yet."""
    status, _ = run(WorkerStatus(), [(0.0, PlatformsChanged(A)), (2.0, Tick()), (2.1, Healthy(A))])
    assert status.state is WorkerState.STARTING


def test_unhealthy_while_starting_is_only_noted() -> None:
    """Failed checks before the start deadline keep STARTING and record the error."""
    status, actions = run(
        WorkerStatus(),
        [(0.0, PlatformsChanged(A)), (2.0, Tick()), (2.0, Started(7)), (3.0, Unhealthy("refused"))],
    )
    assert status.state is WorkerState.STARTING
    assert status.last_error == "refused"
    assert actions == [Spawn(A)]


def test_start_timeout_kills_at_once_and_counts_a_failure() -> None:
    """No healthy answer within start_timeout_s: SIGKILL now, and the exit is a failure."""
    status, actions = run(
        WorkerStatus(),
        [(0.0, PlatformsChanged(A)), (2.0, Tick()), (2.0, Started(7)), (11.9, Tick())],
    )
    assert (status.state, actions) == (WorkerState.STARTING, [Spawn(A)])
    status, emitted = step(status, Tick(), 12.0, POLICY)
    assert emitted == (Kill(),)
    assert (status.state, status.stop_cause) == (WorkerState.STOPPING, StopCause.START_TIMEOUT)
    status, emitted = step(status, Exited(-9), 12.1, POLICY)
    assert (status.state, status.failures, emitted) == (WorkerState.BACKOFF, 1, ())
    assert status.next_start_at == pytest.approx(13.1)
    assert status.last_error is not None
    assert "within 10s" in status.last_error


def test_start_timeout_without_a_pid_fails_directly() -> None:
    """A start that never even reported a pid times out straight into BACKOFF."""
    status, actions = run(
        WorkerStatus(), [(0.0, PlatformsChanged(A)), (2.0, Tick()), (12.0, Tick())]
    )
    assert (status.state, status.failures) == (WorkerState.BACKOFF, 1)
    assert actions == [Spawn(A)]


@pytest.mark.parametrize(
    ("permanent", "state"), [(True, WorkerState.FATAL), (False, WorkerState.BACKOFF)]
)
def test_spawn_failure(permanent: bool, state: WorkerState) -> None:
    """A missing binary is FATAL at once; a transient spawn error backs off."""
    status, _ = run(
        WorkerStatus(),
        [(0.0, PlatformsChanged(A)), (2.0, Tick()), (2.0, SpawnFailed("no buildkitd", permanent))],
    )
    assert status.state is state
    assert status.last_error is not None
    assert "no buildkitd" in status.last_error
    assert status.pid is None


# --- crashes, backoff, fatal -------------------------------------------------------------------


@pytest.mark.parametrize("code", [1, 0, -11])
def test_exit_while_running_backs_off(code: int) -> None:
    """Any exit of a running worker, even code 0, is a failure that backs off."""
    status, actions = step(running(at=10.0), Exited(code), 20.0, POLICY)
    assert (status.state, status.failures, status.pid) == (WorkerState.BACKOFF, 1, None)
    assert status.next_start_at == 21.0
    assert status.last_error == f"buildkitd {describe_exit(code)}"
    assert status.advertised_platforms == ()
    assert actions == ()


def test_backoff_waits_until_next_start() -> None:
    """In BACKOFF nothing happens before next_start_at; at it the worker respawns."""
    status, _ = step(running(at=10.0), Exited(1), 20.0, POLICY)
    status, early = step(status, Tick(), 20.99, POLICY)
    assert (status.state, early) == (WorkerState.BACKOFF, ())
    status, due = step(status, Tick(), 21.0, POLICY)
    assert due == (Spawn(A),)
    assert (status.state, status.restarts, status.failures) == (WorkerState.STARTING, 1, 1)


def test_crash_loop_grows_delays_then_goes_fatal() -> None:
    """Consecutive crashes back off 1, 2, 4 s and the max_failures-th one is FATAL."""
    status, delays = crashed(POLICY.max_failures)
    assert delays == [1.0, 2.0, 4.0]
    assert status.state is WorkerState.FATAL
    assert status.failures == POLICY.max_failures
    assert status.last_error is not None
    assert "gave up after 4" in status.last_error


def test_fatal_stays_fatal() -> None:
    """FATAL ignores time, new platforms and stray exits."""
    status, _ = crashed(POLICY.max_failures)
    status, actions = run(
        status,
        [(1e6, Tick()), (1e6, PlatformsChanged(B)), (2e6, Tick()), (2e6, Exited(1))],
    )
    assert status.state is WorkerState.FATAL
    assert actions == []


def test_reset_leaves_fatal_and_starts_again() -> None:
    """A reset (config reload) clears the failures and spawns with the current platforms."""
    status, _ = crashed(POLICY.max_failures)
    status, actions = step(status, ResetRequested(), 1e6, POLICY)
    assert actions == (Spawn(A),)
    assert (status.state, status.failures, status.last_error) == (WorkerState.STARTING, 0, None)


def test_staying_healthy_resets_the_failure_count() -> None:
    """After stable_s of health the failure count goes back to zero, not before."""
    status, _ = crashed(2)
    status, _ = step(status, Healthy(A), 500.0, POLICY)
    assert status.failures == 2
    status, _ = step(status, Tick(), 529.9, POLICY)
    assert status.failures == 2
    status, _ = step(status, Tick(), 530.0, POLICY)
    assert status.failures == 0


def test_unhealthy_while_running_is_noted_and_cleared() -> None:
    """A failed check keeps RUNNING with last_error; the next answer clears it."""
    status, actions = run(running(), [(20.0, Unhealthy("deadline exceeded"))])
    assert (status.state, status.last_error, actions) == (
        WorkerState.RUNNING,
        "deadline exceeded",
        [],
    )
    status, _ = step(status, Healthy(A), 25.0, POLICY)
    assert status.last_error is None


# --- following the platform set ----------------------------------------------------------------


def test_platform_change_restarts_after_debounce_with_grace() -> None:
    """A new set is debounced, then SIGTERM, SIGKILL after grace, and a spawn with the new set."""
    status, actions = run(running(A, at=10.0), [(20.0, PlatformsChanged(B)), (21.9, Tick())])
    assert (status.state, actions) == (WorkerState.RUNNING, [])
    status, actions = run(status, [(22.0, Tick())])
    assert actions == [Terminate(POLICY.grace_s)]
    assert (status.state, status.stop_cause) == (WorkerState.STOPPING, StopCause.RESTART)
    status, actions = run(status, [(26.9, Tick()), (27.0, Tick()), (27.5, Tick())])
    assert actions == [Kill()]
    status, actions = run(status, [(27.6, Exited(-9))])
    assert actions == [Spawn(B)]
    assert (status.state, status.running_platforms) == (WorkerState.STARTING, B)
    assert (status.restarts, status.failures) == (1, 0)


def test_platform_flap_inside_the_debounce_does_not_restart() -> None:
    """A -> B -> A within debounce_s leaves the running worker alone."""
    status, actions = run(
        running(A, at=10.0),
        [(20.0, PlatformsChanged(B)), (21.0, PlatformsChanged(A)), (30.0, Tick())],
    )
    assert (status.state, actions) == (WorkerState.RUNNING, [])


def test_platform_change_during_start_applies_once_running() -> None:
    """A set changed while starting restarts the worker once it is up and the set settled."""
    status, _ = run(
        WorkerStatus(),
        [(0.0, PlatformsChanged(A)), (2.0, Tick()), (2.0, Started(7)), (2.5, PlatformsChanged(B))],
    )
    status, actions = run(status, [(3.0, Healthy(A)), (4.4, Tick())])
    assert actions == [], "the running proofs answer first"
    proofs = ProofFinished(7, (OK(A[0], True), OK(A[1], True)))
    status, actions = run(status, [(4.45, proofs), (4.5, Tick())])
    assert actions == [Terminate(POLICY.grace_s)]


def test_empty_platform_set_stops_and_holds_the_worker() -> None:
    """When no platform is verified any more the worker stops and is not respawned."""
    status, actions = run(
        running(A, at=10.0),
        [(20.0, PlatformsChanged(())), (22.0, Tick()), (23.0, Exited(0)), (99.0, Tick())],
    )
    assert actions == [Terminate(POLICY.grace_s)]
    assert status.state is WorkerState.STOPPED
    assert status.failures == 0


def test_backoff_respawns_with_the_latest_platforms() -> None:
    """A set changed during BACKOFF is the one the next spawn serves."""
    status, _ = step(running(A, at=10.0), Exited(1), 20.0, POLICY)
    status, actions = run(status, [(20.0, PlatformsChanged(B)), (22.0, Tick())])
    assert actions == [Spawn(B)]


# --- stopping ----------------------------------------------------------------------------------


def test_stop_request_terminates_and_stays_stopped() -> None:
    """StopRequested: SIGTERM, then after the exit STOPPED for good, no respawn."""
    status, actions = run(running(), [(20.0, StopRequested())])
    assert actions == [Terminate(POLICY.grace_s)]
    assert (status.state, status.stop_cause, status.wanted) == (
        WorkerState.STOPPING,
        StopCause.REQUESTED,
        False,
    )
    status, actions = run(status, [(21.0, Exited(0)), (500.0, Tick())])
    assert (status.state, status.pid, actions) == (WorkerState.STOPPED, None, [])
    assert status.failures == 0


def test_stop_request_kills_after_grace() -> None:
    """A worker that ignores SIGTERM gets exactly one SIGKILL once grace_s is over."""
    status, actions = run(
        running(), [(20.0, StopRequested()), (24.9, Tick()), (25.0, Tick()), (26.0, Tick())]
    )
    assert status.state is WorkerState.STOPPING
    assert actions == [Terminate(POLICY.grace_s), Kill()]


@pytest.mark.parametrize("state", [WorkerState.BACKOFF, WorkerState.FATAL])
def test_stop_request_from_backoff_or_fatal(state: WorkerState) -> None:
    """Stopping a worker that has no process goes straight to STOPPED without actions."""
    backoff, _ = step(running(), Exited(1), 20.0, POLICY)
    before = backoff if state is WorkerState.BACKOFF else crashed(POLICY.max_failures)[0]
    assert before.state is state
    status, actions = step(before, StopRequested(), 1e4, POLICY)
    assert (status.state, status.next_start_at, actions) == (WorkerState.STOPPED, None, ())


def test_stop_during_a_restart_wins() -> None:
    """A stop requested while a platform restart is under way ends STOPPED, not respawned."""
    status, _ = run(running(), [(20.0, PlatformsChanged(B)), (22.0, Tick())])
    status, actions = run(status, [(22.5, StopRequested()), (23.0, Exited(0))])
    assert (status.state, actions) == (WorkerState.STOPPED, [])


def test_reset_during_a_requested_stop_brings_it_back() -> None:
    """Reset while stopping turns the stop into a restart."""
    status, _ = run(running(), [(20.0, StopRequested()), (20.5, ResetRequested())])
    status, actions = run(status, [(21.0, Exited(0))])
    assert actions == [Spawn(A)]


def test_restart_request_restarts_with_the_same_platforms() -> None:
    """RestartRequested terminates gracefully and spawns again with the same set."""
    status, actions = run(running(), [(20.0, RestartRequested()), (21.0, Exited(0))])
    assert actions == [Terminate(POLICY.grace_s), Spawn(A)]
    assert status.restarts == 1


@pytest.mark.parametrize(
    "event", [Exited(1), Started(5), Healthy(A), Unhealthy("x"), RestartRequested()]
)
def test_stray_events_when_stopped_are_ignored(event: Event) -> None:
    """Events about a process that does not exist change nothing."""
    status = replace(WorkerStatus(), wanted=False)
    assert step(status, event, 1.0, POLICY) == (status, ())


# --- proof through the worker -----------------------------------------------------------------


def refused(platform: str) -> ProofResult:
    """BuildKit ran the step and it failed."""
    return ProofResult(platform, False, "exit code: 255 (exec format error)")


def test_healthy_worker_is_asked_to_prove_what_it_advertises() -> None:
    """The first ListWorkers answer starts proofs of every advertised platform, extras too."""
    status, actions = run(
        WorkerStatus(),
        [(0.0, PlatformsChanged(A)), (2.0, Tick()), (2.0, Started(7))],
        proofs=True,
    )
    advertised = (*A, "linux/amd64/v2")
    status, actions = run(status, [(3.0, Healthy(advertised))], proofs=True)
    assert actions == [Prove(7, advertised)]
    assert status.proving == tuple(sorted(advertised))


def test_proven_platforms_change_nothing_else() -> None:
    """All proofs passing: every platform proven, no restart, nothing due."""
    status, actions = run(
        running(A), [(11.0, ProofFinished(100, (OK(A[0], True), OK(A[1], True))))]
    )
    assert status.proven == tuple(sorted(A))
    assert (status.proving, status.refused, actions) == ((), (), [])


def test_refused_platform_restarts_the_worker_without_it_after_backoff() -> None:
    """A refusal stops the worker; after the backoff it comes back serving the rest only."""
    status, actions = run(running(A), [(11.0, ProofFinished(100, (refused("linux/arm64"),)))])
    assert actions == [Terminate(POLICY.grace_s)]
    assert dict(status.refused) == {"linux/arm64": "exit code: 255 (exec format error)"}
    status, _ = run(status, [(12.0, Exited(1))])
    assert status.state is WorkerState.BACKOFF
    assert status.failures == 0, "a refusal is not a crash"
    assert status.next_start_at == 12.0 + POLICY.backoff_delay(1)
    status, actions = run(status, [(12.0 + POLICY.backoff_delay(1), Tick())])
    assert actions == [Spawn(("linux/amd64",))]


def test_refusals_arriving_one_by_one_restart_the_worker_once() -> None:
    """Results land separately: no restart until the last proof answered, then one."""
    status = running(A, proven=False)  # both proofs still running
    status, actions = run(status, [(11.0, ProofFinished(100, (refused("linux/arm64"),)))])
    assert (actions, status.state) == ([], WorkerState.RUNNING)
    status, actions = run(status, [(11.5, Tick())])
    assert actions == [], "no restart while a proof is still running"
    status, actions = run(status, [(12.0, ProofFinished(100, (refused("linux/amd64"),)))])
    assert actions == [Terminate(POLICY.grace_s)]
    assert set(dict(status.refused)) == set(A)


def test_a_refusal_is_not_tried_again_so_it_cannot_loop() -> None:
    """Once restarted without the refused platform, healthy answers prove only what is served."""
    status, _ = run(running(A), [(11.0, ProofFinished(100, (refused("linux/arm64"),)))])
    status, _ = run(status, [(12.0, Exited(1)), (20.0, Tick()), (20.0, Started(101))])
    status, actions = run(status, [(21.0, Healthy(("linux/amd64",)))], proofs=True)
    assert actions == [Prove(101, ("linux/amd64",))]
    status, actions = run(status, [(22.0, ProofFinished(101, (OK("linux/amd64", True),)))])
    assert actions == []
    status, actions = run(status, [(30.0, Tick()), (90.0, Tick())], proofs=True)
    assert (actions, status.state, status.restarts) == ([], WorkerState.RUNNING, 1)


def test_refused_buildkit_addition_is_named_but_cannot_be_configured_away() -> None:
    """A platform BuildKit added itself is recorded as refused; no restart would remove it."""
    status, actions = run(running(A), [(11.0, ProofFinished(100, (refused("linux/mips64"),)))])
    assert actions == []
    assert "linux/mips64" in dict(status.refused)
    assert status.servable == A


def test_no_verdict_refuses_nothing_and_is_retried_with_backoff() -> None:
    """A proof without an answer leaves the platform unproven and re-proves it later."""
    lost = ProofResult("linux/arm64", False, "UNAVAILABLE", conclusive=False)
    status, actions = run(running(A), [(11.0, ProofFinished(100, (OK(A[0], True), lost)))])
    assert (actions, status.refused) == ([], ())
    assert dict(status.unproven) == {"linux/arm64": "UNAVAILABLE"}
    due = 11.0 + POLICY.backoff_delay(1)
    status, actions = run(status, [(due - 0.1, Tick())], proofs=True)
    assert actions == []
    status, actions = run(status, [(due, Tick())], proofs=True)
    assert actions == [Prove(100, ("linux/arm64",))]


def test_refusal_is_forgotten_when_the_platform_leaves_the_verified_set() -> None:
    """Verified anew after leaving the set, a refused platform gets a fresh proof."""
    status, _ = run(running(A), [(11.0, ProofFinished(100, (refused("linux/arm64"),)))])
    status, _ = run(status, [(12.0, PlatformsChanged(("linux/amd64",)))])
    assert status.refused == ()
    status, _ = run(status, [(13.0, PlatformsChanged(A))])
    assert status.servable == A


def test_everything_refused_keeps_the_worker_stopped() -> None:
    """With every platform refused the worker stays down (fail closed), saying why."""
    results = (refused("linux/amd64"), refused("linux/arm64"))
    status, _ = run(running(A), [(11.0, ProofFinished(100, results)), (12.0, Exited(1))])
    status, actions = run(status, [(100.0, Tick()), (200.0, Tick())])
    assert (status.state, actions) == (WorkerState.STOPPED, [])


def test_proof_of_an_earlier_process_is_ignored() -> None:
    """Results for a pid that is not the running worker's change nothing."""
    status = running(A)
    assert step(status, ProofFinished(99, (refused("linux/arm64"),)), 11.0, POLICY) == (status, ())


def test_reset_forgets_refusals() -> None:
    """A config reload gives refused platforms another chance."""
    status, _ = run(running(A), [(11.0, ProofFinished(100, (refused("linux/arm64"),)))])
    status, _ = run(status, [(11.5, ResetRequested())])
    assert status.refused == ()


# --- invariants --------------------------------------------------------------------------------

EVENTS = st.one_of(
    st.just(Tick()),
    st.sampled_from([PlatformsChanged(A), PlatformsChanged(B), PlatformsChanged(())]),
    st.integers(1, 9).map(Started),
    st.sampled_from([SpawnFailed("e", True), SpawnFailed("e", False)]),
    st.sampled_from([Healthy(A), Healthy(B), Unhealthy("u")]),
    st.sampled_from([Exited(0), Exited(1), Exited(-9)]),
    st.sampled_from([StopRequested(), RestartRequested(), ResetRequested()]),
    st.sampled_from(
        [
            ProofFinished(1, (ProofResult("linux/arm64", False, "x"),)),
            ProofFinished(2, (ProofResult("linux/amd64", True),)),
            ProofFinished(3, (ProofResult("linux/riscv64", False, "y", conclusive=False),)),
        ]
    ),
)


@settings(max_examples=300)
@given(st.lists(st.tuples(st.floats(0, 5), EVENTS), max_size=60))
def test_invariants_hold_for_any_event_sequence(steps: list[tuple[float, Event]]) -> None:
    """No sequence raises; pids exist only in live states; failures stay within bounds."""
    status, now = WorkerStatus(), 0.0
    live = {WorkerState.STARTING, WorkerState.RUNNING, WorkerState.STOPPING}
    for delta, event in steps:
        now += delta
        status, actions = step(status, event, now, POLICY)
        assert status.pid is None or status.state in live
        assert 0 <= status.failures <= POLICY.max_failures
        assert (status.next_start_at is not None) <= (status.state is WorkerState.BACKOFF)
        assert (status.state is WorkerState.STOPPING) == (status.stop_cause is not None)
        assert all(a.platforms for a in actions if isinstance(a, Spawn))
