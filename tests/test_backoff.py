"""Failing installs back off: exponential, capped, reset when the source changes, logged once.

The pure rule is table-tested; the engine is driven in-process with a fake clock (install
actions only, so no binfmt_misc is touched), counting how often the source is really read.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_deb import GOOD, package, regular

from binfmtd import backoff, deb, emulators, plan
from binfmtd.config import Config, SourceConfig, SourceKind
from binfmtd.engine import Engine, TickReport


@pytest.mark.parametrize(
    ("failures_before", "same_source", "delay"),
    [
        (0, True, 2.0),
        (1, True, 4.0),
        (4, True, 32.0),
        (8, True, 300.0),
        (50, True, 300.0),
        (3, False, 2.0),
    ],
)
def test_delay_doubles_up_to_the_cap_and_restarts_on_a_new_source(
    failures_before: int, same_source: bool, delay: float
) -> None:
    """2 s, 4 s, 8 s ... capped at 300 s; a different source fingerprint starts again at 2 s."""
    previous = (
        backoff.Backoff(failures_before, 0.0, 0.0, "src-a", "err") if failures_before else None
    )
    state = backoff.failed(previous, 100.0, "src-a" if same_source else "src-b", "e", 2, 300)
    assert (state.delay_s, state.retry_at) == (delay, 100.0 + delay)


def test_due_only_after_the_wait_or_when_the_source_changed() -> None:
    """Not due while waiting on the same source; due at retry_at, or at once for a new source."""
    state = backoff.failed(None, 10.0, "a", "e", 2, 300)
    assert backoff.due(None, 0.0, "a")
    assert not backoff.due(state, 11.9, "a")
    assert backoff.due(state, 12.0, "a")
    assert backoff.due(state, 10.5, "b")


class Recorder:
    """A logger that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def is_enabled_for(self, level: int) -> bool:
        """Everything is recorded."""
        return True

    def __getattr__(self, level: str) -> Callable[..., None]:
        def record(event: str, **fields: Any) -> None:
            self.events.append((level, event, fields))

        return record

    def named(self, event: str) -> list[dict[str, Any]]:
        """The fields of every `event`."""
        return [f for _, e, f in self.events if e == event]


class Harness:
    """An Engine with a fake clock, asked every simulated second to install aarch64."""

    def __init__(self, tmp: Path, source: SourceConfig, arch: str = "aarch64") -> None:
        self.now = 1000.0
        self.log = Recorder()
        cfg = Config(
            binfmt_misc=str(tmp / "no-binfmt-misc"),
            install_dir=str(tmp / "qemu"),
            state_file=str(tmp / "state" / "state.json"),
            arches=(arch,),
            source=source,
        )
        self.engine = Engine(cfg, self.log, clock=lambda: self.now, host_machine="x86_64")
        self.arch = arch

    def seconds(self, count: int) -> TickReport:
        """`count` ticks one second apart; the last one's report."""
        report = TickReport()
        for _ in range(count):
            self.now += 1
            report = TickReport()
            self.engine.execute([plan.Install(self.arch, "not installed")], report)
        return report


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every time a .deb is read (its ar headers parsed, then its tarballs decompressed)."""
    seen: list[str] = []
    real = deb.ar_members

    def counting(fd: int, shown: str) -> list[deb.ArMember]:
        seen.append(shown)
        return real(fd, shown)

    monkeypatch.setattr(deb, "ar_members", counting)
    return seen


def broken_deb(path: Path, qemu_deb: Path, cut: int) -> Path:
    """The real .deb cut after `cut` bytes: its data.tar.xz is truncated."""
    with qemu_deb.open("rb") as handle:
        path.write_bytes(handle.read(cut))
    return path


def wrong_arch_deb(path: Path, busybox: Path) -> Path:
    """A well-formed .deb whose qemu-aarch64-static is an arm64 program: it is decompressed and
    copied in full before the ELF check refuses it (the expensive failure)."""
    path.write_bytes(package([regular("./usr/bin/qemu-aarch64-static", busybox.read_bytes())]))
    return path


@pytest.mark.parametrize("kind", ["truncated", "wrong-arch"])
def test_broken_deb_is_read_a_few_times_in_ten_minutes_not_every_second(
    tmp_path: Path,
    qemu_deb: Path,
    busybox: Callable[[str], Path],
    reads: list[str],
    kind: str,
) -> None:
    """600 one-second ticks against a broken .deb read it 9 times (t+0, 2, 6, 14 ... 510 s),
    report the error on every tick, and log it once."""
    if kind == "truncated":
        path = broken_deb(tmp_path / "q.deb", qemu_deb, 4 << 20)
    else:
        path = wrong_arch_deb(tmp_path / "q.deb", busybox("arm64"))
    harness = Harness(tmp_path, SourceConfig(SourceKind.DEB, str(path)))
    report = harness.seconds(600)
    assert len(reads) == 9
    why = "truncated" if kind == "truncated" else "built for ELF machine 183"
    assert why in report.errors["aarch64"]
    assert len(harness.log.named("install_failed")) == 1
    assert harness.engine.backoff["aarch64"].delay_s == 300  # 512 s, capped


def test_a_changed_source_is_retried_at_once_and_a_new_error_logged(
    tmp_path: Path, qemu_deb: Path, reads: list[str]
) -> None:
    """Replacing the .deb ends the wait; a different error is logged again; a good one installs
    and forgets the backoff."""
    package = broken_deb(tmp_path / "q.deb", qemu_deb, 4 << 20)
    harness = Harness(tmp_path, SourceConfig(SourceKind.DEB, str(package)))
    harness.seconds(100)
    read_before = len(reads)
    package.write_bytes(b"not a deb at all")
    report = harness.seconds(1)
    assert len(reads) == read_before + 1
    assert "is not a .deb" in report.errors["aarch64"]
    assert [e["error"][-30:] for e in harness.log.named("install_failed")][1].endswith("signature)")
    package.unlink()
    shutil.copyfile(qemu_deb, package)
    report = harness.seconds(1)
    assert report.errors == {}
    assert harness.engine.backoff == {}
    assert harness.engine.installed["aarch64"].package == "qemu-user-static"


def test_wrong_arch_directory_is_not_rewritten_every_tick(
    tmp_path: Path, busybox: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory whose qemu-aarch64-static is an arm64 program: 9 copies in 600 s, not 600."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(busybox("arm64"), src / "qemu-aarch64-static")
    writes: list[str] = []
    real = emulators.install_stream

    def counting(*args: Any, **kwargs: Any) -> emulators.Written:
        writes.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(emulators, "install_stream", counting)
    harness = Harness(tmp_path, SourceConfig(SourceKind.DIRECTORY, str(src)))
    report = harness.seconds(600)
    assert len(writes) == 9
    assert "built for ELF machine 183" in report.errors["aarch64"]


def test_retry_timing_follows_the_config(tmp_path: Path, qemu_deb: Path, reads: list[str]) -> None:
    """source.retry_initial_s and retry_max_s set the first wait and the cap."""
    package = broken_deb(tmp_path / "q.deb", qemu_deb, 4 << 20)
    source = replace(
        SourceConfig(SourceKind.DEB, str(package)), retry_initial_s=10.0, retry_max_s=20.0
    )
    harness = Harness(tmp_path, source)
    harness.seconds(100)  # failures at t=1, 11, 31, 51, 71, 91
    assert len(reads) == 6
    assert harness.engine.backoff["aarch64"].delay_s == 20


def test_an_arch_the_deb_lacks_is_not_looked_for_again_until_it_changes(
    tmp_path: Path, reads: list[str]
) -> None:
    """A .deb without s390x is read once in 600 s (it cannot grow one); replacing it reads it
    again at once."""
    path = tmp_path / "q.deb"
    path.write_bytes(package(GOOD))
    harness = Harness(tmp_path, SourceConfig(SourceKind.DEB, str(path)), arch="s390x")
    report = harness.seconds(600)
    assert len(reads) == 1
    assert "has no usr/bin/qemu-s390x-static" in report.errors["s390x"]
    assert harness.log.named("install_failed")[0]["retry_in_s"] is None
    path.write_bytes(package([*GOOD, regular("./usr/bin/qemu-s390x", b"other")]))
    harness.seconds(1)
    assert len(reads) == 2
