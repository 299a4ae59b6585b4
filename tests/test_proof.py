"""The proof through the worker, with the Solve call replaced (the real one: test_buildkit_real)."""

from __future__ import annotations

import importlib
from typing import Any

import pytest

from binfmtd.buildkit import SolveOutcome
from binfmtd.llb import RUN_USER, probe_definition
from binfmtd.proof import Solver, probe_arch, prove_platform, prove_platforms
from binfmtd.supervision import ProofResult

ops_pb2: Any = importlib.import_module("binfmtd.buildkit_pb.ops_pb2")


@pytest.mark.parametrize(
    ("platform", "arch"),
    [
        ("linux/amd64", "x86_64"),
        ("linux/amd64/v3", "x86_64"),
        ("linux/386", "i386"),
        ("linux/arm/v7", "arm"),
        ("linux/arm", "arm"),
        ("linux/arm64", "aarch64"),
        ("linux/loong64", "loongarch64"),
        ("linux/mips64le", "mips64el"),
        ("linux/sparc", None),
    ],
)
def test_each_platform_is_proven_by_its_own_arch_probe(platform: str, arch: str | None) -> None:
    """BuildKit runs any binary for any platform, so only the arch's own probe proves it."""
    assert probe_arch(platform) == arch


def test_definition_is_a_run_step_of_that_platform_as_nobody() -> None:
    """file op into scratch, exec op (platform, user 65534, ignore_cache), terminal op last."""
    definition = ops_pb2.Definition.FromString(probe_definition("linux/s390x", b"ELF", "n").data)
    ops = [ops_pb2.Op.FromString(raw) for raw in getattr(definition, "def")]
    assert [op.WhichOneof("op") for op in ops] == ["file", "exec", None]
    assert ops[0].file.actions[0].input == -1 and ops[0].file.actions[0].mkfile.data == b"ELF"
    assert ops[1].exec.meta.args == ["/probe"] and ops[1].exec.meta.user == RUN_USER
    assert ops[1].platform.Architecture == "s390x" and ops[2].inputs[0].index == 0
    assert all(m.ignore_cache for m in definition.metadata.values())


def answer(outcome: SolveOutcome) -> Solver:
    """A Solve stand-in that always answers `outcome`."""

    def solve(socket: str, data: bytes, name: str, timeout: float) -> SolveOutcome:
        return outcome

    return solve


def test_success_needs_the_probes_own_output() -> None:
    """A step that 'ran' but did not print the probe's line proves nothing."""
    result = prove_platform("s", "linux/arm64", 5, answer(SolveOutcome(True, "hello\n")))
    assert (result.ok, result.conclusive) == (False, True)
    assert "binfmtd-probe aarch64" in str(result.error)
    ok = prove_platform(
        "s", "linux/arm64", 5, answer(SolveOutcome(True, "binfmtd-probe aarch64\n"))
    )
    assert ok == ProofResult("linux/arm64", True)


def test_failures_carry_buildkits_error_and_verdict() -> None:
    """BuildKit's error is the reason; a call without a verdict stays inconclusive."""
    refused = SolveOutcome(False, "", "exit code: 255 (exec format error)")
    lost = SolveOutcome(False, "", "UNAVAILABLE", conclusive=False)
    assert prove_platform("s", "linux/s390x", 5, answer(refused)) == ProofResult(
        "linux/s390x", False, "exit code: 255 (exec format error)"
    )
    assert not prove_platform("s", "linux/s390x", 5, answer(lost)).conclusive
    assert not prove_platform("s", "linux/sparc", 5, answer(refused)).conclusive


def test_each_result_is_reported_as_soon_as_it_is_known() -> None:
    """on_result sees every platform once; the returned tuple keeps the asked order."""
    seen: list[ProofResult] = []
    platforms = ("linux/amd64", "linux/arm64", "linux/s390x")
    outcome = SolveOutcome(True, "binfmtd-probe x86_64 aarch64 s390x")
    results = prove_platforms("s", platforms, 5, answer(outcome), seen.append)
    assert [r.platform for r in results] == list(platforms)
    assert sorted(r.platform for r in seen) == sorted(platforms)


def test_missing_output_from_a_lagging_status_stream_is_no_verdict() -> None:
    """A step that succeeded but whose output never arrived is retried, not refused."""
    lagging = SolveOutcome(True, "", output_complete=False)
    result = prove_platform("s", "linux/arm64", 5, answer(lagging))
    assert (result.ok, result.conclusive) == (False, False)
