"""Faults found by attacking the event-driven daemon as a user would (issue 14, session 6).

Each test is one kind of fault, on the real kernel (private binfmt_misc instances) with real
QEMU and real probes: a clobber that wins the race for the entry's name, an installed emulator
whose mode or owner changed, a failing install whose retry time passes with no event, and a
probe runner that stops answering. The daemons here have a safety pass an hour away, so only
events (and the daemon's own timers) can repair anything.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import daemonutil as du
import psutil
import pytest
from conftest import Cache, write_config
from daemonutil import ENTRIES, Daemon, SandboxSh

ARCH = "s390x"


def private_source(tmp_path: Path, qemu_dir: Path) -> Path:
    """A root-owned copy of the cache's QEMU for ARCH and aarch64: an install links to it, so
    a chmod of the installed file never reaches the shared cache."""
    src = tmp_path / "src"
    src.mkdir()
    for arch in (ARCH, "aarch64"):
        name = f"qemu-{arch}-static"
        shutil.copyfile(qemu_dir / name, src / name)
        (src / name).chmod(0o755)
    return src


def config(tmp_path: Path, sock: str, cache: Cache, **overrides: Any) -> Path:
    """ARCH from a private source; the safety pass is an hour away (events only)."""
    body: dict[str, Any] = {
        "api": {"socket": sock, "group": None},
        "lock_file": str(tmp_path / "run" / "binfmtd.lock"),
        "reconcile_interval_s": 3600,
        "arches": [ARCH],
        "source": {"kind": "directory", "path": str(private_source(tmp_path, cache.qemu_dir))},
        "log": {"level": "info", "format": "json"},
    }
    return write_config(tmp_path, **{**body, **overrides})


@pytest.fixture
def daemon(tmp_path: Path, sock: str, cache: Cache) -> Iterator[Daemon]:
    """A --sandbox daemon for ARCH, verified."""
    with du.running(config(tmp_path, sock, cache), sock) as running:
        running.wait_verified([ARCH])
        yield running


def reproven_after(daemon: Daemon, wall: float) -> bool:
    """Whether ARCH shows verified by a probe that ran after `wall`."""
    row = daemon.arch(ARCH)
    return bool(row["state"] == "verified" and row["probe"]["at"] > wall)


# ---------------------------------------------------------------- a clobber wins the race

RACE = r"""
import json, os, sys
sys.path.insert(0, os.environ["REPO"])
import structlog
from binfmtd import config
from binfmtd.engine import Engine

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
eng = Engine(config.load(os.environ["CFG"]), structlog.get_logger())
eng.detect_native()
kernel = eng.kernel
ours = eng.registration("aarch64")
# Another tool's aarch64 entry under binfmtd's name, running another emulator.
foreign = ours.register_string().replace(ours.interpreter, eng.registration("s390x").interpreter)
real_register = kernel.register
racing = False

def register(reg):
    if racing and reg.name == ours.name:  # the tool registers again right after our removal
        with open(kernel.root / "register", "w") as handle:
            handle.write(foreign)
    real_register(reg)

kernel.register = register
out = {"first": eng.tick().verified}
with open(kernel.root / ours.name, "w") as handle:  # the clobber: remove ours, register theirs
    handle.write("-1")
with open(kernel.root / "register", "w") as handle:
    handle.write(foreign)
racing = True
lost = eng.tick()
out["race_errors"] = lost.errors
out["race_written"] = sorted(lost.written)
out["race_state"] = eng.status_of("aarch64").state.value
racing = False
eng.tick()
row = eng.status_of("aarch64")
out["after_state"] = row.state.value
out["after_interpreter"] = open(kernel.root / ours.name).read().split("interpreter ")[1].split()[0]
out["ours"] = ours.interpreter
print(json.dumps(out))
"""


def test_a_clobber_that_wins_the_race_for_the_name_is_still_restored(
    sandbox_sh: SandboxSh, tmp_path: Path
) -> None:
    """Another tool registers binfmtd's entry name again between binfmtd's removal of its
    clobber and the new registration (EEXIST): the pass says so (not verified), counts the
    round for the backoff, and the next pass restores binfmtd's entry. Before, the failed
    registration dropped the name from the ownership record, and the other tool's entry was
    left alone as `foreign` for good."""
    cfg = write_config(tmp_path, arches=["aarch64", "s390x"])
    out = du.sandbox_json(sandbox_sh, RACE, {"CFG": str(cfg)})
    assert sorted(out["first"]) == ["aarch64", "s390x"]
    assert "EEXIST" in out["race_errors"]["aarch64"], out
    assert out["race_written"] == ["aarch64"]  # the removal happened: a round of the fight
    assert out["race_state"] != "verified"
    assert out["after_state"] == "verified", out
    assert out["after_interpreter"] == out["ours"]


# ---------------------------------------------------------------- the installed file's metadata


def test_a_setuid_installed_emulator_is_installed_again_as_made(daemon: Daemon) -> None:
    """chmod 4755 on the installed QEMU (a setuid-root emulator runs any foreign binary as
    root for whoever starts it): binfmtd installs it again, root 0755, and proves it anew.
    Before, the bytes still matched their checksum, so the setuid file stayed, shown verified."""
    installed = Path(daemon.install_dir) / f"qemu-{ARCH}"
    wall = time.time()
    installed.chmod(0o4755)
    du.wait_until("re-proven after the chmod", lambda: reproven_after(daemon, wall), 30)
    st = installed.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o755, 0)


def test_an_installed_emulator_a_user_owns_is_never_registered_again(daemon: Daemon) -> None:
    """chown 1000 on the installed QEMU (linked: the source's inode too, so it cannot be
    installed again), then a flush: binfmtd does not register the file a user could change
    and says why (held before this session too, by the checksum's trusted open; kept as the
    owner half of the installed file's metadata check)."""
    installed = Path(daemon.install_dir) / f"qemu-{ARCH}"
    os.chown(installed, 1000, -1)
    daemon.ns_ok(f"echo -1 > {ENTRIES}/status")

    def refused() -> dict[str, Any] | None:
        row = daemon.arch(ARCH)
        said = "writable by a non-root user" in (row["error"] or "")
        return row if said and not row["registered"] else None

    row = du.wait_until("the refusal in status, no entry", refused, 30)
    assert row["state"] != "verified" and not row["working"]
    assert daemon.ns(f"test -e {ENTRIES}/qemu-{ARCH}").returncode != 0
    os.chown(installed, 0, -1)


def test_an_installed_emulator_a_user_comes_to_own_loses_its_entry_at_once(
    daemon: Daemon,
) -> None:
    """chown 1000 on the installed QEMU while it is registered (linked: the source's inode
    too, so it cannot be installed again): with `F` the kernel would go on running the file
    that user can now rewrite, for every s390x binary, root's included. binfmtd removes its
    entry at once and says why; owned by root again, the entry is back and proven anew.
    Before, the entry stayed and status said verified (with the install's error)."""
    installed = Path(daemon.install_dir) / f"qemu-{ARCH}"

    def removed() -> dict[str, Any] | None:
        row = daemon.arch(ARCH)
        said = "removed: the installed emulator is no longer root's" in (row["error"] or "")
        return row if said and not row["registered"] else None

    try:
        os.chown(installed, 1000, -1)
        row = du.wait_until("the entry removed, saying why", removed, 30)
        assert row["state"] != "verified" and not row["working"], row
        assert daemon.ns(f"test -e {ENTRIES}/qemu-{ARCH}").returncode != 0
    finally:
        os.chown(installed, 0, -1)
    wall = time.time()
    du.wait_until("back and proven once root's again", lambda: reproven_after(daemon, wall), 30)


def test_a_deleted_state_file_is_written_again_by_the_next_pass(
    tmp_path: Path, sock: str, cache: Cache
) -> None:
    """The state file deleted under the daemon (nothing else changing): the next pass (the
    safety pass here, 1 s) writes it again with the ownership record and the checksum, so a
    restart still knows binfmtd's own entry. Before, it stayed missing until something changed,
    and a restart then called the entry another tool's (a conflict) and hashed everything."""
    state = tmp_path / "state" / "state.json"
    cfg = config(tmp_path, sock, cache, reconcile_interval_s=1)
    with du.running(cfg, sock) as running:
        running.wait_verified([ARCH])
        before = json.loads(state.read_text())
        state.unlink()
        du.wait_until("the state file written again", state.exists, 30)
        after = json.loads(state.read_text())
        assert after["entries"] == before["entries"] and after["entries"], after
        assert after["emulators"].keys() == before["emulators"].keys() == {ARCH}, after
    with du.running(cfg, sock) as again:
        again.wait_verified([ARCH])
        assert not again.events("conflict_left_alone"), again.log_text()[-2000:]


# ---------------------------------------------------------------- a broken source


def test_a_flush_while_the_source_is_broken_is_repaired_with_the_installed_emulator(
    daemon: Daemon, tmp_path: Path
) -> None:
    """The source's QEMU replaced by a file that is not one (a half-done upgrade), then a
    flush: binfmtd cannot install from the source, so it registers the emulator it installed
    before (still its recorded bytes and mode) and proves it; status keeps the source's error.
    Before, the failed install skipped the registration: the arch was left with no entry."""
    source = tmp_path / "src" / f"qemu-{ARCH}-static"
    broken = tmp_path / "src" / "broken"
    broken.write_text("not an emulator\n")
    broken.chmod(0o755)
    broken.rename(source)
    du.wait_until(
        "the source's error in status",
        lambda: "not an ELF" in (daemon.arch(ARCH)["error"] or ""),
        30,
    )
    before = len(daemon.events("entry_registered"))
    daemon.ns_ok(f"echo -1 > {ENTRIES}/status")

    def restored() -> bool:
        done = daemon.events("entry_registered")[before:]
        return any(e["arch"] == ARCH and e["reason"] == "entry missing" for e in done)

    du.wait_until("the flushed entry registered again", restored, 30)
    du.wait_until("verified", lambda: daemon.arch(ARCH)["state"] == "verified", 30)
    row = daemon.arch(ARCH)
    assert row["working"] and row["interpreter"] == f"{daemon.install_dir}/qemu-{ARCH}", row
    assert "not an ELF" in row["error"]


def test_a_platform_stays_verified_while_its_source_is_broken(
    daemon: Daemon, tmp_path: Path
) -> None:
    """The source's QEMU broken (a half-done upgrade) while the installed one works: every
    pass plans the reinstall and cannot do it, and the entry never stops running the proven
    file, so status says verified throughout (read while 15 passes run). Before, each pass
    dropped the proof first: the platform flickered to unverified (and out of the worker's
    set) at every pass, whatever triggered it."""
    broken = tmp_path / "src" / "broken"
    broken.write_text("not an emulator\n")
    broken.chmod(0o755)
    broken.rename(tmp_path / "src" / f"qemu-{ARCH}-static")
    du.wait_until(
        "the source's error in status",
        lambda: "not an ELF" in (daemon.arch(ARCH)["error"] or ""),
        30,
    )
    du.wait_until("verified", lambda: daemon.arch(ARCH)["state"] == "verified", 30)

    def passes() -> None:
        for _ in range(15):
            daemon.ctl("reconcile")

    trigger = threading.Thread(target=passes)
    trigger.start()
    seen = set()
    while trigger.is_alive():
        row = daemon.arch(ARCH)
        seen.add((row["state"], row["working"]))
    trigger.join()
    assert seen == {("verified", True)}, sorted(seen)


# ---------------------------------------------------------------- timers with no event


def test_a_failed_install_is_retried_when_its_backoff_ends(
    tmp_path: Path, sock: str, cache: Cache
) -> None:
    """An install that failed (the install directory's parent was group-writable) is retried
    when its backoff ends (2 s), although nothing binfmtd watches changes when the parent is
    fixed; before, the retry waited for the next event or the safety pass (here an hour)."""
    parent = tmp_path / "inst"
    parent.mkdir(mode=0o755)
    cfg = config(tmp_path, sock, cache, install_dir=str(parent / "qemu"))
    with du.running(cfg, sock) as daemon:
        daemon.wait_verified([ARCH])
        parent.chmod(0o775)
        (parent / "qemu" / f"qemu-{ARCH}").unlink()
        du.wait_until(
            "the install failure in status",
            lambda: "writable by a non-root user" in (daemon.arch(ARCH)["error"] or ""),
            30,
        )
        parent.chmod(0o755)  # not watched: only the backoff's end can bring the retry
        installed = parent / "qemu" / f"qemu-{ARCH}"

        def reinstalled() -> bool:
            row = daemon.arch(ARCH)
            return installed.exists() and row["state"] == "verified" and row["error"] is None

        du.wait_until("re-installed, verified, no error", reinstalled, 60)


# ---------------------------------------------------------------- a probe runner that hangs


def is_probe_runner(process: psutil.Process) -> bool:
    """Whether `process` is a probe runner (an exited child, a zombie, is not)."""
    try:
        return "binfmtd.probe_runner" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def test_a_stopped_probe_runner_fails_its_probes_and_is_replaced(
    tmp_path: Path, sock: str, cache: Cache
) -> None:
    """The probe runner stopped (SIGSTOP: as a hung one) while a repair waits for its probe:
    after probe.timeout_s + a grace the runner is killed, the probe fails saying why, the
    daemon answers again and a new runner proves the arch. Before, the loop waited for the
    runner forever: every API mutation timed out (504) and no drift was repaired."""
    cfg = config(tmp_path, sock, cache, probe={"timeout_s": 1.0})
    with du.running(cfg, sock) as daemon:
        daemon.wait_verified([ARCH])
        runners = [p for p in psutil.Process(daemon.pid).children() if is_probe_runner(p)]
        assert len(runners) == 1, runners
        runner = runners[0]
        runner.send_signal(signal.SIGSTOP)
        try:
            wall = time.time()
            daemon.ns_ok(f"echo -1 > {ENTRIES}/qemu-{ARCH}")
            code, _ = daemon.post("/v1/verify", b'{"arches": ["s390x"]}')
            assert code in (200, 422)  # answered: the stalled probe failed, or a retry passed
            code, answer = daemon.post("/v1/verify", b'{"arches": ["s390x"]}')
            assert (code, answer["verified"]) == (200, [ARCH]), answer
            assert reproven_after(daemon, wall)
            failed = [e["error"] for e in daemon.events("probe_failed")]
            assert any("answered nothing" in e and "stopped or hung" in e for e in failed), failed
            assert not runner.is_running() or runner.status() == psutil.STATUS_ZOMBIE
        finally:
            if runner.is_running():
                runner.kill()


# ---------------------------------------------------------------- before the first watch

FIRST_WATCH = r"""
import json, os, sys, threading, time
sys.path.insert(0, os.environ["REPO"])
import structlog
from binfmtd import config, service

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
cfg = config.load(os.environ["CFG"])
daemon = service.Daemon(cfg, sandbox=None, config_path=os.environ["CFG"], safe_mode=False)
daemon.engine.start_probe_runner()
daemon.engine.detect_native()
first = daemon._tick().verified  # the first pass, as before READY=1
entry = daemon.engine.kernel.root / daemon.engine.registration("s390x").name
with open(entry, "w") as handle:  # a drift before the loop has added its watches
    handle.write("-1")
loop = threading.Thread(target=daemon._loop)
loop.start()
deadline = time.monotonic() + 20
while not entry.exists() and time.monotonic() < deadline:
    time.sleep(0.02)
restored = entry.exists()
daemon.stopping = True
daemon.wake.set()
loop.join(30)
daemon.engine.close()
print(json.dumps({"first": first, "restored": restored}))
"""


def test_a_drift_before_the_loop_watches_is_repaired_without_the_safety_pass(
    sandbox_sh: SandboxSh, tmp_path: Path
) -> None:
    """An entry removed after the first pass but before the loop added its inotify watches
    (the window between READY=1 and the loop: a client may act on the first status) is
    repaired at once: a freshly added watch is followed by a pass. Before, the loop slept
    until the safety pass (here an hour), as no event could report that removal."""
    cfg = write_config(tmp_path, arches=[ARCH], reconcile_interval_s=3600)
    out = du.sandbox_json(sandbox_sh, FIRST_WATCH, {"CFG": str(cfg)})
    assert out == {"first": [ARCH], "restored": True}


# ---------------------------------------------------------------- part of an arch's binaries

# Another tool's s390x entry for position-independent executables only (e_type ET_DYN, 3):
# most binaries of a distribution's container image, but not binfmtd's static probe (ET_EXEC).
PIE_MAGIC = bytes.fromhex("7f454c4602020100000000000000000000030016")
PIE_MASK = bytes.fromhex("ffffffffffffff00ffffffffffffffffffffffff")


def _entry(name: str, magic: bytes, mask: bytes, extension: str | None = None) -> Any:
    from binfmtd.binfmt import Entry

    return Entry(name, True, "/bin/true", "F", 0, magic, mask, extension)


def test_entries_overlap_when_some_header_matches_both() -> None:
    """Observation.shadowing: the standard s390x entry (ET_EXEC or ET_DYN) and a PIE-only one
    share files, whichever is newer; entries of another byte order or class, or an extension
    entry, share none."""
    from binfmtd import arch as archmod
    from binfmtd.truth import Observation

    def shadows(newer: Any, older: Any) -> bool:
        return Observation(True, (newer, older)).shadowing(older) == (newer,)

    row = archmod.BY_NAME["s390x"]
    ours = _entry(
        "qemu-s390x", bytes(b & k for b, k in zip(row.magic, row.mask, strict=True)), row.mask
    )
    pie = _entry("other-s390x-pie", PIE_MAGIC, PIE_MASK)
    little = _entry("other", PIE_MAGIC[:5] + b"\x01" + PIE_MAGIC[6:], PIE_MASK)
    assert shadows(pie, ours) and shadows(ours, pie)
    assert not shadows(little, ours)
    assert not shadows(_entry("ext", b"", b"", extension="bin"), ours)
    shorter = _entry("elf64", PIE_MAGIC[:5], PIE_MASK[:5])  # every 64-bit ELF file
    assert shadows(shorter, ours)


def test_the_plan_leaves_or_removes_an_entry_catching_part_of_an_arch() -> None:
    """A newer foreign entry catching part of s390x (not the probe) is a Conflict left alone
    under leave, removed under replace; binfmtd's own entry stays either way."""
    from test_plan import entry, kinds, reg, run

    from binfmtd.plan import Remove

    pie = _entry("other-s390x-pie", PIE_MAGIC, PIE_MASK)
    ours = entry(reg(ARCH))
    assert kinds(run([pie, ours], {ARCH: True})) == ["Conflict"]
    assert run([pie, ours], {ARCH: True}, replace_policy=True) == [
        Remove(
            ARCH,
            "other-s390x-pie",
            "catches part of the s390x binaries before binfmtd's qemu-s390x "
            "(conflict_policy: replace)",
        )
    ]
    assert run([ours, pie], {ARCH: True}) == []  # tried after ours: it shadows nothing


def test_an_entry_catching_part_of_an_arch_keeps_it_from_working(
    daemon: Daemon, tmp_path: Path, cache: Cache
) -> None:
    """Another tool's newer entry catching only s390x PIE executables (not the probe): the
    kernel really runs such a binary through it, so s390x is shown shadowed-by-foreign, not
    working, a conflict, out of `platforms`, and `check` fails; removing it makes s390x
    verified again. Before, status said verified (the probe's header was the only one
    looked at) while most binaries of an s390x image went to the other tool's interpreter."""
    pie = tmp_path / "pie-s390x"
    header = bytearray(cache.busybox("s390x").read_bytes())
    header[16:18] = b"\x00\x03"  # e_type ET_DYN, as a position-independent executable
    pie.write_bytes(bytes(header))
    pie.chmod(0o755)
    line = f":other-s390x-pie:M::{_escaped(PIE_MAGIC)}:{_escaped(PIE_MASK)}:/bin/echo:F"
    daemon.ns_ok(f"printf '%s' '{line}' > {ENTRIES}/register")
    du.wait_until("s390x shadowed", lambda: daemon.arch(ARCH)["state"] == "shadowed-by-foreign", 30)
    row = daemon.arch(ARCH)
    assert not row["working"] and row["conflict"]
    assert "other-s390x-pie (/bin/echo)" in row["error"] and "part of the s390x" in row["error"]
    assert "linux/s390x" not in daemon.get("/v1/platforms")[1]["platforms"]
    assert daemon.ctl("check").returncode == 1
    ran = daemon.ns_ok(str(pie))  # /bin/echo prints the binary's path: it ran through it
    assert ran.stdout.strip() == str(pie)
    daemon.ns_ok(f"echo -1 > {ENTRIES}/other-s390x-pie")
    du.wait_until("verified again", lambda: daemon.arch(ARCH)["state"] == "verified", 30)


def _escaped(data: bytes) -> str:
    """Bytes as a register string writes them (\\xHH; printf '%s' keeps the backslashes)."""
    return "".join(f"\\x{b:02x}" for b in data)


# ---------------------------------------------------------------- the emulator itself caught


def test_an_entry_catching_the_emulator_itself_fails_the_arch_at_once(
    daemon: Daemon, cache: Cache
) -> None:
    """Another tool's entry whose magic catches binfmtd's installed qemu-s390x itself (a
    program of this host: the kernel then runs the emulator through that entry's interpreter):
    s390x is `failed` at once, naming that entry, and leaves platforms; the kernel really fails
    an s390x binary. Before, the arch's own entry was unchanged, so its earlier proof stood:
    verified and advertised until the next probe (re-verification: 10 minutes by default)."""
    emulator = Path(daemon.install_dir) / f"qemu-{ARCH}"
    head = emulator.read_bytes()[:32]  # ELF header up to e_entry: this file, not the shell
    mask = bytes([0xFF] * len(head))
    line = f":catch-qemu:M::{_escaped(head)}:{_escaped(mask)}:/bin/false:"
    daemon.ns_ok(f"printf '%s' '{line}' > {ENTRIES}/register")
    du.wait_until("s390x failed", lambda: daemon.arch(ARCH)["state"] == "failed", 30)
    row = daemon.arch(ARCH)
    assert not row["working"] and "catch-qemu (/bin/false" in row["error"]
    assert "linux/s390x" not in daemon.get("/v1/platforms")[1]["platforms"]
    assert daemon.ns(f"{cache.busybox('s390x')} true").returncode != 0
    daemon.ns_ok(f"echo -1 > {ENTRIES}/catch-qemu")
    du.wait_until("verified again", lambda: daemon.arch(ARCH)["state"] == "verified", 30)
    assert daemon.ns(f"{cache.busybox('s390x')} true").returncode == 0
