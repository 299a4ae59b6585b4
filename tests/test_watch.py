"""Event-driven reconcile: the inotify watcher on a real private binfmt_misc instance, the
backoff policy table-tested, and a daemon whose safety pass is far away repairing at once."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import daemonutil as du
import pytest
from conftest import write_config
from daemonutil import ENTRIES, Daemon, SandboxSh

from binfmtd import watch
from binfmtd.watch import Change, Kind, Pacer, Target, Waker, Watcher

# ---------------------------------------------------------------- Pacer (pure)


def test_a_few_repairs_are_not_a_fight() -> None:
    """Four restores of an entry within the window hold nothing."""
    pacer = Pacer(limit=5, window_s=5.0)
    for t in range(4):
        assert pacer.repaired(["aarch64"], float(t)) == []
    assert pacer.held(4.0) == {} and pacer.next_release(4.0) is None


def test_a_fight_is_held_with_a_conflict_and_doubling_backoff() -> None:
    """The fifth restore within 5 s holds that arch only, 1 s then 2 s, and says why."""
    pacer = Pacer(limit=5, window_s=5.0, initial_s=1.0, max_s=60.0)
    for i in range(4):
        assert pacer.repaired(["aarch64", "s390x" if i == 0 else "aarch64"], i * 0.1) == []
    assert pacer.repaired(["aarch64"], 0.4) == ["aarch64"]
    held = pacer.held(0.5)
    assert list(held) == ["aarch64"]
    assert "another tool keeps rewriting this entry" in held["aarch64"]
    assert "backs off 1 s" in held["aarch64"]
    assert pacer.next_release(0.5) == pytest.approx(1.4)
    assert pacer.held(1.5) == {}
    for i in range(4):
        assert pacer.repaired(["aarch64"], 1.5 + i * 0.1) == []
    assert pacer.repaired(["aarch64"], 2.0) == ["aarch64"]
    assert pacer.next_release(2.0) == pytest.approx(4.0)  # doubled


def test_backoff_is_capped_and_a_quiet_window_ends_the_fight() -> None:
    """Backoff never exceeds max_s; after a quiet window the next fight starts at initial_s."""
    pacer = Pacer(limit=2, window_s=5.0, initial_s=1.0, max_s=3.0)
    now = 0.0
    for _ in range(4):
        pacer.repaired(["arm"], now)
        assert pacer.repaired(["arm"], now) == ["arm"]
        now = pacer.next_release(now) or now
    assert pacer.fights["arm"].backoff_s == 3.0
    now += 20.0
    pacer.repaired(["arm"], now)
    assert pacer.repaired(["arm"], now) == ["arm"]
    assert pacer.next_release(now) == pytest.approx(now + 1.0)


def test_targets_cover_binfmt_misc_install_dir_and_source(tmp_path: Path) -> None:
    """A directory source is watched for qemu-* names, a .deb source for its own name."""

    class Src:
        path = str(tmp_path)

    found = watch.targets("/b", "/i", Src())
    assert found == [
        Target(Kind.BINFMT, "/b"),
        Target(Kind.INSTALL, "/i"),
        Target(Kind.SOURCE, str(tmp_path), prefix="qemu-"),
    ]
    assert found[2].wants("qemu-arm-static") and not found[2].wants("ls")
    Src.path = str(tmp_path / "q.deb")
    deb = watch.targets("/b", "/i", Src())[2]
    assert deb == Target(Kind.SOURCE, str(tmp_path), exact="q.deb")
    assert deb.wants("q.deb") and not deb.wants("q.deb.partial") and deb.wants("")
    assert watch.targets("/b", "/i", None) == found[:2]


# ---------------------------------------------------------------- Watcher, real inotify


def test_waker_wakes_a_waiting_watcher_from_another_thread(tmp_path: Path) -> None:
    """Waker.set from another thread ends Watcher.wait with an empty Change."""
    waker = Waker()
    watcher = Watcher(waker)
    try:
        assert watcher.watch([Target(Kind.INSTALL, str(tmp_path))])
        threading.Timer(0.05, waker.set).start()
        change = watcher.wait(30)
        assert waker.is_set() and not change
        waker.clear()
        assert not waker.is_set()
    finally:
        watcher.close()
        waker.close()


def test_install_dir_events_and_its_removal_are_seen(tmp_path: Path) -> None:
    """A file replaced in the install dir is a change; removing the dir loses the watch,
    and refresh() watches it again once it exists."""
    install = tmp_path / "qemu"
    install.mkdir()
    with _watching(Target(Kind.INSTALL, str(install))) as watcher:
        (install / "qemu-arm").write_bytes(b"x")
        assert watcher.wait(5).kinds == {Kind.INSTALL}
        (install / "qemu-arm").unlink()
        install.rmdir()
        change = watcher.wait(5)
        assert Kind.INSTALL in change.lost or Kind.INSTALL in change.kinds
        while watcher.wait(0.05):
            pass
        assert not watcher.refresh()  # gone: nothing to watch
        install.mkdir()
        assert watcher.refresh()
        os.chmod(install / ".", 0o755)
        (install / "qemu-arm").write_bytes(b"y")
        assert watcher.wait(5).kinds == {Kind.INSTALL}


def test_what_changed_reads_during_a_pass_is_still_waited_for(tmp_path: Path) -> None:
    """`changed()` (asked while a pass runs) says yes for a change and no when nothing new
    came; the change it read still ends the next `wait` at once: the repair pass runs."""
    install = tmp_path / "qemu"
    install.mkdir()
    with _watching(Target(Kind.INSTALL, str(install))) as watcher:
        assert not watcher.changed()
        (install / "qemu-arm").write_bytes(b"x")
        du.wait_until("the change", watcher.changed, 5, 0.01)
        assert not watcher.changed()  # read already: nothing new
        change = watcher.wait(5)  # what changed() read (read again, nothing would come)
        assert change.kinds == {Kind.INSTALL}
        assert not watcher.wait(0.05)


@contextlib.contextmanager
def _watching(*targets: Target) -> Iterator[Watcher]:
    """A Watcher of `targets`, closed (with its Waker) on the way out."""
    waker = Waker()
    watcher = Watcher(waker)
    try:
        watcher.watch(targets)
        yield watcher
    finally:
        watcher.close()
        waker.close()


WATCH_SCRIPT = r"""
import json, os, subprocess, sys
from binfmtd.watch import Kind, Target, Waker, Watcher
root = "/proc/sys/fs/binfmt_misc"
line = sys.argv[1]
waker = Waker(); watcher = Watcher(waker)
watcher.watch([Target(Kind.BINFMT, root)])
def write(name, text):
    with open(os.path.join(root, name), "w") as handle:
        handle.write(text)
def step(label, action):
    action()
    change = watcher.wait(5)
    out = {"step": label, "kinds": sorted(change.kinds), "lost": sorted(change.lost),
           "overflow": change.overflow}
    print(json.dumps(out), flush=True)
step("register", lambda: write("register", line))
step("disable", lambda: write("qemu-aarch64", "0"))
step("remove", lambda: write("qemu-aarch64", "-1"))
def burst():
    for _ in range(3):
        write("register", line)
        write("status", "-1")
step("flush", burst)
step("unmount", lambda: subprocess.run(["umount", root], check=True))
subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", root], check=True)
print(json.dumps({"step": "rewatch", "added": watcher.refresh()}), flush=True)
step("after-remount", lambda: write("register", line))
"""


def test_binfmt_misc_changes_and_unmount_are_seen(sandbox_sh: SandboxSh, tmp_path: Path) -> None:
    """In a private instance: register, disable, remove and a burst of flushes each end the
    wait as a binfmt_misc change (the burst as one); an unmount loses the watch, and refresh()
    watches the new mount so later changes are seen again."""
    from binfmtd import arch as archmod
    from binfmtd.binfmt import Registration

    cache_qemu = os.environ.get("BINFMTD_CACHE", str(du.REPO / "cache")) + "/qemu/usr/bin"
    row = archmod.BY_NAME["aarch64"]
    line = Registration(
        row.entry_name, row.magic, row.mask, f"{cache_qemu}/qemu-aarch64-static", "F"
    ).register_string()
    script_path = tmp_path / "watch_script.py"
    script_path.write_text(WATCH_SCRIPT, encoding="utf-8")
    result = sandbox_sh(f'cd "$REPO" && "$PYTHON" {script_path} \'{line}\'')
    assert result.returncode == 0, result.stderr
    steps = {s["step"]: s for s in map(json.loads, result.stdout.splitlines())}
    for name in ("register", "disable", "remove", "flush", "after-remount"):
        assert steps[name]["kinds"] == ["binfmt_misc"], steps[name]
    assert steps["unmount"]["lost"] == ["binfmt_misc"], steps["unmount"]
    assert steps["rewatch"]["added"] is True


def test_change_reason_names_what_happened() -> None:
    """Change is falsy when nothing changed; its reason is short and stable for the log."""
    assert not Change()
    assert Change(overflow=True).reason == "overflow"
    assert Change(lost=frozenset({Kind.BINFMT})).reason == "lost:binfmt_misc"
    assert Change(kinds=frozenset({Kind.INSTALL, Kind.BINFMT})).reason == "binfmt_misc,install_dir"


# ---------------------------------------------------------------- the daemon, event-driven

ARCHES = ["aarch64", "s390x"]


def slow_safety_config(tmp_path: Path, sock: str, **overrides: Any) -> Path:
    """A daemon whose safety pass (an hour) never runs during the test: only events can."""
    body: dict[str, Any] = {
        "api": {"socket": sock, "group": None},
        "lock_file": str(tmp_path / "run" / "binfmtd.lock"),
        "reconcile_interval_s": 3600,
        "arches": ARCHES,
        "log": {"level": "info", "format": "json"},
    }
    return write_config(tmp_path, **{**body, **overrides})


@pytest.fixture
def daemon(tmp_path: Path, sock: str) -> Iterator[Daemon]:
    """A --sandbox daemon with a one-hour safety pass, ready."""
    with du.running(slow_safety_config(tmp_path, sock), sock) as running:
        running.wait_verified(ARCHES)
        yield running


def test_removed_entry_is_repaired_and_reproven_without_waiting_for_the_safety_pass(
    daemon: Daemon,
) -> None:
    """Removing an entry, flushing the instance or deleting an emulator is repaired and
    re-proven by events alone (the safety pass is an hour away)."""
    for script, broken in (
        (f"echo -1 > {ENTRIES}/qemu-aarch64", ["aarch64"]),
        (f"echo -1 > {ENTRIES}/status", ARCHES),
        (f"rm {daemon.install_dir}/qemu-s390x", ["s390x"]),
    ):
        wall = time.time()
        daemon.ns_ok(script)

        def reproven(broken: list[str] = broken, wall: float = wall) -> bool:
            rows = daemon.arches()
            return all(
                rows[a]["state"] == "verified" and rows[a]["probe"]["at"] > wall for a in broken
            )

        du.wait_until(f"{broken} re-proven after {script!r}", reproven, timeout=20)


def test_a_removal_through_another_mount_of_the_instance_is_seen_by_events(
    daemon: Daemon,
) -> None:
    """binfmt_misc's events belong to the instance, not to one mount of it: an entry removed
    through a second mount of the same private instance (the write would fail were it another
    instance) is repaired and re-proven by events alone, the safety pass being an hour away."""
    wall = time.time()
    daemon.ns_ok(
        'd=$(mktemp -d) && mount -t binfmt_misc binfmt_misc "$d" && '
        '{ echo -1 > "$d/qemu-aarch64"; rc=$?; umount "$d"; rmdir "$d"; exit $rc; }'
    )
    du.wait_until(
        "aarch64 re-proven after a removal through a second mount",
        lambda: (r := daemon.arch("aarch64"))["state"] == "verified" and r["probe"]["at"] > wall,
        timeout=20,
    )


def test_unmounted_instance_is_remounted_and_watched_again(daemon: Daemon) -> None:
    """binfmt_misc unmounted under the daemon: mounted again, entries restored, and a later
    removal is still seen (the new mount is watched)."""
    unmounted = time.time()
    daemon.ns_ok(f"umount {ENTRIES}")
    du.wait_until(
        "binfmt_misc remounted", lambda: daemon.events("binfmt_misc_remounted"), timeout=20
    )
    du.wait_until(
        "both arches re-proven in the new mount",
        lambda: all(
            r["state"] == "verified" and r["probe"]["at"] > unmounted
            for r in daemon.arches().values()
        ),
        timeout=20,
    )
    wall = time.time()
    daemon.ns_ok(f"echo -1 > {ENTRIES}/qemu-aarch64")
    du.wait_until(
        "aarch64 re-proven after the remount",
        lambda: (r := daemon.arch("aarch64"))["state"] == "verified" and r["probe"]["at"] > wall,
        timeout=20,
    )


def test_a_tool_rewriting_an_entry_in_a_loop_gets_backoff_not_a_busy_daemon(
    daemon: Daemon,
) -> None:
    """Another tool removing our entry in a loop: the daemon backs off with a conflict in
    status (not one repair per removal), and restores the entry once the tool stops."""
    fighter = (
        f"end=$(( $(date +%s) + 4 )); while [ $(date +%s) -lt $end ]; do "
        f"[ -e {ENTRIES}/qemu-aarch64 ] && echo -1 > {ENTRIES}/qemu-aarch64 || true; done"
    )
    fight = threading.Thread(target=daemon.ns_ok, args=(fighter,))
    fight.start()
    shown: set[str] = set()
    while fight.is_alive():
        with contextlib.suppress(*du.TRANSIENT):
            shown.add(daemon.arch("aarch64")["error"] or "")
        time.sleep(0.05)
    fight.join()
    held = daemon.events("repair_backed_off")
    assert held and {e["arch"] for e in held} == {"aarch64"}, daemon.log_text()[-2000:]
    repairs = [
        e for e in daemon.events("reconcile_finished") if "register qemu-aarch64" in e["repaired"]
    ]
    assert len(repairs) <= Pacer().limit * (len(held) + 1), (len(repairs), len(held))
    assert any("another tool keeps rewriting this entry" in text for text in shown), shown
    daemon.wait_verified(ARCHES, timeout=90)
    assert daemon.arch("s390x")["state"] == "verified"


def test_queue_overflow_asks_for_a_full_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IN_Q_OVERFLOW (events were dropped) ends the wait as an overflow Change: a full pass.

    The kernel's queue limit is a host-wide sysctl, so the overflow record itself is faked at
    the one seam (the inotify read); everything else is the real watcher."""
    from inotify_simple import Event, flags

    waker = Waker()
    watcher = Watcher(waker)
    try:
        watcher.watch([Target(Kind.INSTALL, str(tmp_path))])
        (tmp_path / "qemu-arm").write_bytes(b"x")  # makes the real fd readable
        assert watcher._ino is not None
        monkeypatch.setattr(
            watcher._ino, "read", lambda timeout=None: [Event(-1, flags.Q_OVERFLOW, 0, "")]
        )
        change = watcher.wait(5)
        assert change.overflow and change and change.reason == "overflow"
    finally:
        watcher.close()
        waker.close()
