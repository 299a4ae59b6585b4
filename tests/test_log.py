"""log.Repeats: a recurring failure is logged when it starts, changes and ends, with a count."""

from __future__ import annotations

from typing import Any

from binfmtd.log import Repeats


class Recorder:
    """A logger that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append(("warning", event, fields))

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append(("info", event, fields))


def test_start_repeat_change_end() -> None:
    """Ten identical failures give one line; a new message one more; recovery one with counts."""
    now = [100.0]
    log = Recorder()
    repeats = Repeats(log, "install_failed", "install_recovered", clock=lambda: now[0])
    for _ in range(10):
        repeats.seen("s390x", "source gone")
        now[0] += 1
    repeats.seen("s390x", "no qemu-s390x-static")
    now[0] += 2.5
    assert repeats.failing == {"s390x": "no qemu-s390x-static"}
    repeats.seen("s390x", "no qemu-s390x-static")
    repeats.cleared("s390x")
    repeats.cleared("s390x")  # nothing open: silent
    started = {"arch": "s390x", "error": "source gone", "repeat": "started", "count": 0}
    changed = {"arch": "s390x", "error": "no qemu-s390x-static", "repeat": "changed", "count": 10}
    ended = {"arch": "s390x", "error": "no qemu-s390x-static", "count": 2, "duration_s": 2.5}
    assert log.lines == [
        ("warning", "install_failed", started),
        ("warning", "install_failed", changed),
        ("info", "install_recovered", ended),
    ]


def test_update_takes_the_whole_failing_set() -> None:
    """`update` opens new keys, keeps repeats quiet and closes keys that are gone."""
    log = Recorder()
    repeats = Repeats(log, "probe_failed", "probe_recovered", clock=lambda: 0.0)
    assert repeats.update({"a": "x", "b": "y"}) is True
    assert repeats.update({"a": "x", "b": "y"}) is False
    assert repeats.update({"a": "x"}) is True
    assert [(e, f["arch"]) for _, e, f in log.lines] == [
        ("probe_failed", "a"),
        ("probe_failed", "b"),
        ("probe_recovered", "b"),
    ]
