"""The fault matrix: each test breaks one thing under binfmtd and names the expected outcome.

Daemons run with `--sandbox` inside an outer `unshare --user --map-root-user --mount`, so
whatever they register lives in a private binfmt_misc; one-shot runs compose with `sandbox_sh`'s
private instance (both through daemonutil).
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import daemonutil as du
import pytest
from conftest import daemon_config, write_config
from daemonutil import ENTRIES, SandboxSh, checksum_file, run_daemon, run_oneshot, wait_until

from binfmtd import arch as archmod
from binfmtd.binfmt import Registration
from binfmtd.preflight import Exit


def more_events(daemon: du.Daemon, name: str, seen: int) -> bool:
    """Whether the daemon logged `name` more than `seen` times."""
    return len(daemon.events(name)) > seen


# ---------------------------------------------------------------- the install directory


def test_disk_full_during_install_is_reported_and_leaves_nothing_partial(
    sandbox_sh: SandboxSh, tmp_path: Path, qemu_dir: Path
) -> None:
    """install_dir on a 20M tmpfs: ENOSPC per arch, exit 1, only complete files registered."""
    arches = ["aarch64", "arm", "ppc64le", "riscv64", "s390x"]
    cfg = write_config(tmp_path, arches=arches, log={"level": "info", "format": "json"})
    mount = 'mkdir -p "$INSTALL" && mount -t tmpfs -o size=20M,mode=0755 tmpfs "$INSTALL"'
    run = run_oneshot(sandbox_sh, tmp_path, cfg, mount)
    assert run["rc"] == Exit.ARCH_FAILED
    rows = {row["arch"]: row for row in run["doc"]["arches"]}
    failed = [a for a in arches if rows[a]["state"] != "verified"]
    assert len(failed) >= 3, rows
    for arch in failed:
        assert "No space left on device" in (rows[arch]["error"] or ""), rows[arch]
        assert f"qemu-{arch}" not in run["entries"]
        assert f"{arch}: " in run["stderr"]
    assert not [f for f in run["files"] if f.startswith(".binfmtd-tmp-")], run["files"]
    installed = [f.removeprefix("qemu-") for f in run["files"] if f.startswith("qemu-")]
    assert set(installed) == set(arches) - set(failed)
    for arch in installed:
        assert rows[arch]["checksum"] == checksum_file(qemu_dir / f"qemu-{arch}-static")


def test_read_only_install_dir_is_a_clear_error_and_nothing_is_registered(
    sandbox_sh: SandboxSh, tmp_path: Path
) -> None:
    """install_dir mounted read-only: each arch says "Read-only file system", exit 1, no entry."""
    cfg = write_config(tmp_path, arches=["aarch64", "s390x"])
    readonly = 'mkdir -p "$INSTALL" && mount --bind "$INSTALL" "$INSTALL" && '
    readonly += 'mount -o remount,bind,ro "$INSTALL"'
    run = run_oneshot(sandbox_sh, tmp_path, cfg, readonly)
    assert run["rc"] == Exit.ARCH_FAILED
    for row in run["doc"]["arches"]:
        assert row["state"] in {"error", "missing"}, row
        assert "Read-only file system" in row["error"], row
        assert not row["registered"]
    assert run["entries"] == ""
    assert run["files"] == [".", ".."]


def test_replaced_interpreter_is_reinstalled_from_the_source(
    daemons: list[du.Daemon], tmp_path: Path, qemu_dir: Path
) -> None:
    """Another binary renamed over qemu-aarch64: re-installed, right sha, verified again."""
    daemon = run_daemon(daemons, daemon_config(tmp_path))
    daemon.wait_verified(["aarch64", "s390x"])
    good = checksum_file(qemu_dir / "qemu-aarch64-static")
    target = Path(daemon.install_dir) / "qemu-aarch64"
    impostor = Path(daemon.install_dir) / "impostor"
    shutil.copyfile(qemu_dir / "qemu-arm-static", impostor)
    impostor.chmod(0o755)
    impostor.rename(target)
    before = len(daemon.events("emulator_installed"))

    def repaired() -> bool:
        row = daemon.arches()["aarch64"]
        return bool(
            len(daemon.events("emulator_installed")) > before
            and row["state"] == "verified"
            and row["checksum"] == good
        )

    wait_until("aarch64 re-installed and verified", repaired, 20)
    assert checksum_file(target) == good
    reinstalled = daemon.events("emulator_installed")[before:]
    assert [e["arch"] for e in reinstalled] == ["aarch64"]
    assert any(
        "interpreter reinstalled" in str(e["repaired"]) or "register qemu-aarch64" in e["repaired"]
        for e in daemon.events("reconcile_finished")
    )


def test_source_gone_keeps_working_entries_and_reports_when_an_install_is_needed(
    daemons: list[du.Daemon], tmp_path: Path, qemu_dir: Path
) -> None:
    """Source deleted: entries stay verified; s390x's interpreter deleted too: s390x errors."""
    source = tmp_path / "source"
    source.mkdir()
    for arch in ("aarch64", "s390x"):
        shutil.copyfile(qemu_dir / f"qemu-{arch}-static", source / f"qemu-{arch}-static")
    cfg = daemon_config(tmp_path, source={"kind": "directory", "path": str(source)})
    daemon = run_daemon(daemons, cfg)
    daemon.wait_verified(["aarch64", "s390x"])
    shutil.rmtree(source)
    code, answer = daemon.post("/v1/verify")
    assert code == 200 and sorted(answer["verified"]) == ["aarch64", "s390x"], answer
    rows = daemon.arches()
    assert all(rows[a]["state"] == "verified" and not rows[a]["error"] for a in rows), rows
    os.unlink(Path(daemon.install_dir) / "qemu-s390x")

    def reported() -> dict[str, Any] | None:
        rows = daemon.arches()
        return rows if str(source) in (rows["s390x"]["error"] or "") else None

    rows = wait_until("s390x to report the missing source", reported, 10)
    assert "does not exist" in rows["s390x"]["error"]
    assert rows["aarch64"]["state"] == "verified" and rows["aarch64"]["error"] is None
    assert daemon.events("install_failed")[-1]["arch"] == "s390x"
    assert daemon.get("/v1/health")[1]["ok"]


# ---------------------------------------------------------------- binfmt_misc itself


def test_binfmt_misc_unmounted_under_the_daemon_is_remounted_and_repaired(
    daemons: list[du.Daemon], tmp_path: Path
) -> None:
    """umount binfmt_misc in the daemon's namespace: it remounts, re-registers, verifies again."""
    daemon = run_daemon(daemons, daemon_config(tmp_path))
    daemon.wait_verified(["aarch64", "s390x"])
    daemon.ns_ok(f"umount {ENTRIES}")
    wait_until("binfmt_misc_remounted", lambda: daemon.events("binfmt_misc_remounted"), 10)
    daemon.wait_verified(["aarch64", "s390x"])
    mounted = daemon.ns_ok(f"grep -c ' {ENTRIES} ' /proc/self/mountinfo; cat {ENTRIES}/status")
    assert mounted.stdout.split()[-1] == "enabled"
    listed = daemon.ns_ok(f"ls {ENTRIES}").stdout.split()
    assert {"qemu-aarch64", "qemu-s390x"} <= set(listed)
    assert daemon.events("binfmt_misc_unavailable")


KERNEL_ERRORS = f"""
import os, sys
from binfmtd.binfmt import Registration
from binfmtd.kernel import BinfmtMisc, KernelError
k = BinfmtMisc("{ENTRIES}")
row = Registration("qemu-aarch64", bytes.fromhex("7f454c46020101"), b"\\xff" * 7, sys.argv[1], "F")
k.register(row)
def attempt(label, reg):
    try:
        k.register(reg)
    except KernelError as exc:
        print(label, exc.errno, exc, sep="|")
attempt("eexist", row)
class Malformed(Registration):
    def register_string(self):
        return ":bad-entry:Q:0:zz::/bin/true:F"
bad = object.__new__(Malformed)
object.__setattr__(bad, "name", "bad-entry")
attempt("einval", bad)
missing = Registration("qemu-nowhere", b"\\x7fXYZ", b"\\xff" * 4, "/nonexistent/qemu-x", "F")
attempt("enoent", missing)
"""


def test_kernel_errors_carry_an_actionable_hint(
    sandbox_sh: SandboxSh, tmp_path: Path, qemu_dir: Path
) -> None:
    """Real EEXIST, EINVAL (rejected line shown), ENOENT (F, no interpreter): clear KernelErrors."""
    script = tmp_path / "kernel_errors.py"
    script.write_text(KERNEL_ERRORS, encoding="utf-8")
    interp = qemu_dir / "qemu-aarch64-static"
    result = sandbox_sh(f'cd "$REPO" && "$PYTHON" {script} {interp}')
    assert result.returncode == 0, result.stderr
    lines = {line.split("|")[0]: line.split("|") for line in result.stdout.splitlines()}
    assert int(lines["eexist"][1]) == errno.EEXIST
    assert "an entry with that name exists already" in lines["eexist"][2]
    assert int(lines["einval"][1]) == errno.EINVAL
    assert "the kernel rejected the line" in lines["einval"][2]
    assert "line: ':bad-entry:Q:0:zz::/bin/true:F'" in lines["einval"][2]
    assert int(lines["enoent"][1]) == errno.ENOENT
    assert "does the interpreter exist?" in lines["enoent"][2]


def test_foreign_entry_under_another_name_under_leave_is_a_reported_conflict(
    daemons: list[du.Daemon], tmp_path: Path, qemu_dir: Path
) -> None:
    """A foreign entry catching aarch64 under another name, under leave: left alone, reported,
    and the arch is proven again through it (the kernel now tries the foreign entry first)."""
    daemon = run_daemon(daemons, daemon_config(tmp_path))
    first = daemon.wait_verified(["aarch64", "s390x"])["aarch64"]["probe"]["at"]
    row = archmod.BY_NAME["aarch64"]
    foreign = Registration(
        "other-aarch64", row.magic, row.mask, str(qemu_dir / "qemu-aarch64-static"), "F"
    )
    daemon.ns_ok(f"printf '%s' '{foreign.register_string()}' > {ENTRIES}/register")

    def conflict() -> dict[str, Any] | None:
        rows = daemon.arches()
        reported = "made by another tool" in (rows["aarch64"]["error"] or "")
        reprobed = (rows["aarch64"]["probe"] or {}).get("at", 0) > first
        return rows if reported and reprobed else None

    rows = wait_until("the conflict to be reported", conflict, 10)
    assert rows["aarch64"]["state"] == "shadowed-by-foreign"
    assert rows["aarch64"]["interpreter"] == foreign.interpreter  # the kernel's handler now
    ours = daemon.ns_ok(f"cat {ENTRIES}/qemu-aarch64").stdout  # ours, still in place
    assert f"interpreter {daemon.install_dir}/qemu-aarch64" in ours
    assert rows["s390x"]["state"] == "verified"
    text = daemon.ns_ok(f"cat {ENTRIES}/other-aarch64").stdout
    assert f"interpreter {foreign.interpreter}" in text


# ---------------------------------------------------------------- probes that misbehave

FAKE_QEMU = r"""
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--version") == 0) {
        puts("qemu-fake version 0.0");
        return 0;
    }
#ifdef HANG
    for (;;) pause();
#else
    raise(SIGSEGV);
    return 1;
#endif
}
"""


@pytest.fixture(scope="module")
def fake_qemus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Static x86_64 "emulators" built with gcc: one hangs, one segfaults."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the misbehaving emulators (apt-get install gcc)")
    work = tmp_path_factory.mktemp("fakeqemu")
    (work / "fake.c").write_text(FAKE_QEMU, encoding="utf-8")
    built = {}
    for name, flags in (("hang", ["-DHANG"]), ("crash", [])):
        out = work / name
        subprocess.run(
            ["gcc", "-static", "-O2", *flags, "-o", str(out), str(work / "fake.c")], check=True
        )
        built[name] = out
    return built


def test_hanging_and_crashing_probes_fail_without_stopping_the_loop(
    daemons: list[du.Daemon], tmp_path: Path, qemu_dir: Path, fake_qemus: dict[str, Path]
) -> None:
    """A hanging emulator times out, a crashing one fails: not verified; the loop ticks on."""
    source = tmp_path / "source"
    source.mkdir()
    shutil.copyfile(fake_qemus["hang"], source / "qemu-aarch64-static")
    shutil.copyfile(fake_qemus["crash"], source / "qemu-arm-static")
    shutil.copyfile(qemu_dir / "qemu-s390x-static", source / "qemu-s390x-static")
    cfg = daemon_config(
        tmp_path,
        arches=["aarch64", "arm", "s390x"],
        source={"kind": "directory", "path": str(source)},
        probe={"timeout_s": 1.0, "parallelism": 4},
    )
    daemon = run_daemon(daemons, cfg)
    rows = daemon.arches()
    assert rows["aarch64"]["state"] == "failed"
    assert rows["aarch64"]["probe"]["error"] == "probe did not finish within 1 s"
    assert rows["arm"]["state"] == "failed"
    assert rows["arm"]["probe"]["error"].startswith("probe exited -11"), rows["arm"]
    assert rows["s390x"]["state"] == "verified"
    code, platforms = daemon.get("/v1/platforms")
    assert code == 200 and "linux/s390x" in platforms["emulated"]
    assert "linux/arm64" not in platforms["platforms"]
    first = daemon.status()["daemon"]["last_reconcile"]
    wait_until("another tick", lambda: daemon.status()["daemon"]["last_reconcile"] > first, 5)
    assert daemon.get("/v1/health")[1]["ok"]


# Probe scheduling under wall-clock jumps (back: re-verify at once; forward: re-verify) is a
# pure decision now: tests/test_plan.py::test_due_probes holds the table.


# ---------------------------------------------------------------- the process around it


def test_notify_socket_missing_or_dangling_changes_nothing(
    daemons: list[du.Daemon], tmp_path: Path
) -> None:
    """NOTIFY_SOCKET unset or naming no socket: the daemon runs; a real socket receives READY=1."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    real = tmp_path / "notify.sock"
    listener.bind(str(real))
    listener.settimeout(30)
    cases = {"unset": None, "dangling": str(tmp_path / "nothing" / "notify.sock"), "real": real}
    try:
        for label, value in cases.items():
            work = tmp_path / label
            work.mkdir()
            env = {} if value is None else {"NOTIFY_SOCKET": str(value)}
            daemon = run_daemon(daemons, daemon_config(work, arches=["s390x"]), env=env)
            daemon.wait_verified(["s390x"])
            if label == "real":
                messages = [listener.recv(4096).decode() for _ in range(2)]
                ready = [m for m in messages if "READY=1" in m]
                assert ready and "1/1 architectures verified" in ready[0], messages
            daemon.stop()
    finally:
        listener.close()


def test_bad_config_on_sighup_keeps_the_old_one_and_says_so(
    daemons: list[du.Daemon], tmp_path: Path
) -> None:
    """Config garbage, then deleted, before SIGHUP: reload_failed logged, the old config runs."""
    cfg = daemon_config(tmp_path)
    good = cfg.read_text()
    daemon = run_daemon(daemons, cfg)
    daemon.wait_verified(["aarch64", "s390x"])
    for breakage in ("garbage", "deleted"):
        if breakage == "garbage":
            cfg.write_text("arches: [aarch64\n  flags: {{{\n\x00")
        else:
            cfg.unlink()
        seen = len(daemon.events("reload_failed"))
        os.kill(daemon.pid, signal.SIGHUP)
        wait_until(
            "reload_failed", functools.partial(more_events, daemon, "reload_failed", seen), 10
        )
        event = daemon.events("reload_failed")[-1]
        assert str(cfg) in event["error"] and event["keeping"] == str(cfg)
        assert daemon.proc is not None and daemon.proc.poll() is None
        daemon.wait_verified(["aarch64", "s390x"])
    code, answer = daemon.post("/v1/reload")
    assert code == 422 and "still running on the old configuration" in answer["error"]
    cfg.write_text(good.replace("- s390x", "- s390x\n- riscv64"))
    os.kill(daemon.pid, signal.SIGHUP)
    wait_until("config_reloaded", lambda: daemon.events("config_reloaded"), 10)
    daemon.wait_verified(["aarch64", "s390x", "riscv64"])


def test_second_daemon_on_the_same_lock_exits_71(daemons: list[du.Daemon], tmp_path: Path) -> None:
    """A second binfmtd on the same lock_file: exit 71 naming the holder's pid."""
    cfg = daemon_config(tmp_path, arches=["s390x"])
    first = run_daemon(daemons, cfg)
    second = du.run(du.sandbox_argv(cfg), 60)
    assert second.returncode == Exit.ALREADY_RUNNING, second.stderr
    assert f"another binfmtd (pid {first.pid}) holds" in second.stderr
    assert first.get("/v1/health")[1]["ok"]


def test_stale_socket_of_a_killed_daemon_is_recovered(
    daemons: list[du.Daemon], tmp_path: Path
) -> None:
    """kill -9 leaves the socket file; the next daemon removes it and serves."""
    cfg = daemon_config(tmp_path, arches=["s390x"])
    first = run_daemon(daemons, cfg)
    first.kill()
    assert os.path.exists(first.sock)
    second = run_daemon(daemons, cfg)
    assert second.events("stale_socket_removed")
    assert second.status()["daemon"]["pid"] == second.pid


def test_missing_worker_binary_is_fatal_for_the_worker_only(
    daemons: list[du.Daemon], tmp_path: Path
) -> None:
    """buildkit.path /nonexistent/buildkitd: the daemon serves, the worker is FATAL, clear error."""
    kit = {
        "enabled": True,
        "path": "/nonexistent/buildkitd",
        "socket": str(tmp_path / "run" / "buildkitd.sock"),
        "state_dir": str(tmp_path / "buildkit"),
        "config_path": str(tmp_path / "run" / "buildkitd.toml"),
        "socket_group": None,
    }
    daemon = run_daemon(daemons, daemon_config(tmp_path, arches=["s390x"], buildkit=kit))
    daemon.wait_verified(["s390x"])

    def fatal() -> dict[str, Any] | None:
        code, worker = daemon.get("/v1/worker")
        return worker if code == 200 and str(worker.get("state")).upper() == "FATAL" else None

    worker = wait_until("the worker to be FATAL", fatal, 15)
    assert "/nonexistent/buildkitd" in worker["last_error"]
    assert "not an executable" in worker["last_error"]
    assert daemon.get("/v1/health")[1]["ok"]
    assert daemon.status()["worker"]["state"].upper() == "FATAL"
