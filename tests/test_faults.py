"""The fault matrix: each test breaks one thing under binfmtd and names the expected outcome.

Daemons run with `--sandbox` inside an outer `unshare --user --map-root-user --mount`, so
whatever they register lives in a private binfmt_misc; one-shot runs compose with `sandbox_sh`'s
private instance. Helpers here (`SandboxDaemon`, `http`) are shared with test_access and
test_hostile.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BINFMTD, SandboxSh, write_config

from binfmtd import arch as archmod
from binfmtd import config as configmod
from binfmtd.binfmt import Registration
from binfmtd.engine import Engine
from binfmtd.preflight import Exit
from binfmtd.probe import ProbeResult
from binfmtd.service import RETRY_FAILED_S, Daemon

ENTRIES = "/proc/sys/fs/binfmt_misc"
OUTER = ("unshare", "--user", "--map-root-user", "--mount")


# ---------------------------------------------------------------- shared helpers


def http(
    path: str, method: str, target: str, body: bytes = b"", timeout: float = 60
) -> tuple[int, Any]:
    """One request over the Unix socket; (status, decoded JSON body)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        head = (
            f"{method} {target} HTTP/1.1\r\nHost: binfmtd\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
    head_bytes, _, payload = bytes(data).partition(b"\r\n\r\n")
    return int(head_bytes.split()[1]), json.loads(payload) if payload else None


def wait_for(check: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, ValueError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(step)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}; last: {last!r}")


def sha256(path: Path | str) -> str:
    """sha256 of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class SandboxDaemon:
    """`binfmtd --sandbox --config CFG` as a daemon, with its log, API and namespace at hand."""

    def __init__(self, cfg: Path, *, outer: bool = True, env: dict[str, str] | None = None):
        self.cfg = cfg
        body = _yaml(cfg)
        self.socket = body["api"]["socket"]
        self.install_dir = body["install_dir"]
        self.log_path = cfg.parent / f"daemon-{time.monotonic_ns()}.log"
        self.outer = outer
        self.env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, ready: bool = True, timeout: float = 60) -> SandboxDaemon:
        """Start it; with `ready`, wait until the API answers and the daemon says ready."""
        argv = [*(OUTER if self.outer else ()), BINFMTD, "--sandbox", "--config", str(self.cfg)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env
            )
        if ready:
            wait_for(self._ready, timeout, f"the daemon to be ready (log: {self.log_text()})")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"binfmtd exited {self.proc.returncode}: {self.log_text()}")
        return bool(os.path.exists(self.socket) and self.get("/v1/health")[1]["ready"])

    @property
    def pid(self) -> int:
        """The daemon's pid (outer unshare execs it, so it is the same process)."""
        assert self.proc is not None
        return self.proc.pid

    def get(self, target: str) -> tuple[int, Any]:
        """GET `target`."""
        return http(self.socket, "GET", target)

    def post(self, target: str, body: bytes = b"") -> tuple[int, Any]:
        """POST `target`."""
        return http(self.socket, "POST", target, body)

    def status(self) -> dict[str, Any]:
        """GET /v1/status."""
        code, doc = self.get("/v1/status")
        assert code == 200, doc
        return dict(doc)

    def arches(self) -> dict[str, dict[str, Any]]:
        """arch -> its status row."""
        return {row["arch"]: row for row in self.status()["arches"]}

    def nsenter(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `sh -c script` as root in the daemon's user + mount namespaces."""
        result = subprocess.run(
            ["nsenter", "--target", str(self.pid), "--user", "--mount", "--", "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def log_text(self) -> str:
        """Everything the daemon logged so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log events (optionally only `name`)."""
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if name is None or event.get("event") == name:
                    out.append(event)
        return out

    def wait_verified(self, arches: list[str], timeout: float = 30) -> dict[str, Any]:
        """Until every arch in `arches` shows verified; returns the rows."""

        def done() -> dict[str, Any] | None:
            rows = self.arches()
            return rows if all(rows[a]["state"] == "verified" for a in arches) else None

        return dict(wait_for(done, timeout, f"{arches} verified"))

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Signal the daemon and reap it; its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def more_events(daemon: SandboxDaemon, name: str, seen: int) -> bool:
    """Whether the daemon logged `name` more than `seen` times."""
    return len(daemon.events(name)) > seen


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    return dict(yaml.safe_load(path.read_text(encoding="utf-8")))


def daemon_config(tmp: Path, **overrides: Any) -> Path:
    """A daemon config: json logs at info, 0.2 s reconcile, two arches unless overridden."""
    base: dict[str, Any] = {
        "arches": ["aarch64", "s390x"],
        "reconcile_interval_s": 0.2,
        "log": {"level": "info", "format": "json"},
    }
    return write_config(tmp, **(base | overrides))


@pytest.fixture
def daemons() -> Iterator[list[SandboxDaemon]]:
    """Daemons a test starts; each is stopped afterwards."""
    started: list[SandboxDaemon] = []
    yield started
    for daemon in started:
        daemon.stop()


def run_daemon(daemons: list[SandboxDaemon], cfg: Path, **kwargs: Any) -> SandboxDaemon:
    """Start a daemon for `cfg`, stopped at teardown."""
    daemon = SandboxDaemon(cfg, **kwargs)
    daemons.append(daemon)
    return daemon.start()


def oneshot_script(extra: str = "") -> str:
    """sandbox_sh script: `extra` set-up, then `binfmtd --oneshot --json`, then the evidence."""
    return f"""{extra}
rc=0; "$BINFMTD" --oneshot --json --config "$CFG" >"$OUT/out" 2>"$OUT/err" || rc=$?
echo "$rc" >"$OUT/rc"
grep -H . {ENTRIES}/qemu-* >"$OUT/entries" 2>/dev/null || true
ls -a "$INSTALL" >"$OUT/ls" 2>/dev/null || true
"""


def run_oneshot(sandbox_sh: SandboxSh, tmp: Path, cfg: Path, extra: str = "") -> dict[str, Any]:
    """The outcome of a one-shot run in a private instance: rc, JSON, stderr, entries, files."""
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    env = {"OUT": str(out), "CFG": str(cfg), "INSTALL": str(tmp / "qemu")}
    result = sandbox_sh(oneshot_script(extra), env=env)
    assert result.returncode == 0, result.stderr
    text = (out / "out").read_text()
    return {
        "rc": int((out / "rc").read_text()),
        "doc": json.loads(text) if text.strip() else None,
        "stderr": (out / "err").read_text(),
        "entries": (out / "entries").read_text(),
        "files": (out / "ls").read_text().split(),
    }


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
        assert rows[arch]["sha256"] == sha256(qemu_dir / f"qemu-{arch}-static")


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
    daemons: list[SandboxDaemon], tmp_path: Path, qemu_dir: Path
) -> None:
    """Another binary renamed over qemu-aarch64: re-installed, right sha, verified again."""
    daemon = run_daemon(daemons, daemon_config(tmp_path))
    daemon.wait_verified(["aarch64", "s390x"])
    good = sha256(qemu_dir / "qemu-aarch64-static")
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
            and row["sha256"] == good
        )

    wait_for(repaired, 20, "aarch64 re-installed and verified")
    assert sha256(target) == good
    reinstalled = daemon.events("emulator_installed")[before:]
    assert [e["arch"] for e in reinstalled] == ["aarch64"]
    assert any(
        "interpreter reinstalled" in str(e["repaired"]) or "register qemu-aarch64" in e["repaired"]
        for e in daemon.events("reconcile_finished")
    )


def test_source_gone_keeps_working_entries_and_reports_when_an_install_is_needed(
    daemons: list[SandboxDaemon], tmp_path: Path, qemu_dir: Path
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

    rows = wait_for(reported, 10, "s390x to report the missing source")
    assert "does not exist" in rows["s390x"]["error"]
    assert rows["aarch64"]["state"] == "verified" and rows["aarch64"]["error"] is None
    assert daemon.events("install_failed")[-1]["arch"] == "s390x"
    assert daemon.get("/v1/health")[1]["ok"]


# ---------------------------------------------------------------- binfmt_misc itself


def test_binfmt_misc_unmounted_under_the_daemon_is_remounted_and_repaired(
    daemons: list[SandboxDaemon], tmp_path: Path
) -> None:
    """umount binfmt_misc in the daemon's namespace: it remounts, re-registers, verifies again."""
    daemon = run_daemon(daemons, daemon_config(tmp_path))
    daemon.wait_verified(["aarch64", "s390x"])
    daemon.nsenter(f"umount {ENTRIES}")
    wait_for(lambda: daemon.events("binfmt_misc_remounted"), 10, "binfmt_misc_remounted")
    daemon.wait_verified(["aarch64", "s390x"])
    mounted = daemon.nsenter(f"grep -c ' {ENTRIES} ' /proc/self/mountinfo; cat {ENTRIES}/status")
    assert mounted.stdout.split()[-1] == "enabled"
    listed = daemon.nsenter(f"ls {ENTRIES}").stdout.split()
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


def test_foreign_same_name_entry_under_leave_is_a_reported_conflict(
    daemons: list[SandboxDaemon], tmp_path: Path, qemu_dir: Path
) -> None:
    """A foreign qemu-aarch64 appears under leave: left alone, reported as a conflict."""
    daemon = run_daemon(daemons, daemon_config(tmp_path))
    daemon.wait_verified(["aarch64", "s390x"])
    row = archmod.BY_NAME["aarch64"]
    foreign = Registration(
        row.entry_name, row.magic, row.mask, str(qemu_dir / "qemu-aarch64-static"), "F"
    )
    daemon.nsenter(
        f"echo -1 > {ENTRIES}/qemu-aarch64; printf '%s' '{foreign.register_string()}' "
        f"> {ENTRIES}/register"
    )

    def conflict() -> dict[str, Any] | None:
        rows = daemon.arches()
        return rows if "made by another tool" in (rows["aarch64"]["error"] or "") else None

    rows = wait_for(conflict, 10, "the conflict to be reported")
    assert rows["aarch64"]["interpreter"] == foreign.interpreter
    assert rows["aarch64"]["state"] != "verified"
    assert rows["s390x"]["state"] == "verified"
    text = daemon.nsenter(f"cat {ENTRIES}/qemu-aarch64").stdout
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
    daemons: list[SandboxDaemon], tmp_path: Path, qemu_dir: Path, fake_qemus: dict[str, Path]
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
    wait_for(lambda: daemon.status()["daemon"]["last_reconcile"] > first, 5, "another tick")
    assert daemon.get("/v1/health")[1]["ok"]


class Clock:
    """A wall clock the test moves."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_wall_clock_jumps_neither_stall_nor_storm_probe_scheduling(tmp_path: Path) -> None:
    """Wall time jumping back re-verifies once (never waits out the jump); forward re-verifies."""
    cfg = configmod.load(str(write_config(tmp_path, arches=["aarch64", "s390x"])))
    clock = Clock(1_000_000.0)
    daemon = Daemon(cfg, sandbox=False, config_path=None, clock=clock)
    assert isinstance(daemon.engine, Engine) and daemon.engine.clock is clock
    daemon.engine.probes = {
        "aarch64": ProbeResult("aarch64", True, clock.now, 5.0),
        "s390x": ProbeResult("s390x", False, clock.now, 5.0, "probe exited 1"),
    }
    clock.now += 5
    assert daemon._due_for_probe() == ()
    clock.now += RETRY_FAILED_S
    assert daemon._due_for_probe() == ("s390x",)
    clock.now = 1_000_000.0 - 3600  # NTP steps the clock back an hour
    assert set(daemon._due_for_probe()) == {"aarch64", "s390x"}
    clock.now = 1_000_000.0 + 86400  # and forward a day
    assert set(daemon._due_for_probe()) == {"aarch64", "s390x"}


# ---------------------------------------------------------------- the process around it


def test_notify_socket_missing_or_dangling_changes_nothing(
    daemons: list[SandboxDaemon], tmp_path: Path
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
    daemons: list[SandboxDaemon], tmp_path: Path
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
        wait_for(functools.partial(more_events, daemon, "reload_failed", seen), 10, "reload_failed")
        event = daemon.events("reload_failed")[-1]
        assert str(cfg) in event["error"] and event["keeping"] == str(cfg)
        assert daemon.proc is not None and daemon.proc.poll() is None
        daemon.wait_verified(["aarch64", "s390x"])
    code, answer = daemon.post("/v1/reload")
    assert code == 422 and "still running on the old configuration" in answer["error"]
    cfg.write_text(good.replace("- s390x", "- s390x\n- riscv64"))
    os.kill(daemon.pid, signal.SIGHUP)
    wait_for(lambda: daemon.events("config_reloaded"), 10, "config_reloaded")
    daemon.wait_verified(["aarch64", "s390x", "riscv64"])


def test_second_daemon_on_the_same_lock_exits_71(
    daemons: list[SandboxDaemon], tmp_path: Path
) -> None:
    """A second binfmtd on the same lock_file: exit 71 naming the holder's pid."""
    cfg = daemon_config(tmp_path, arches=["s390x"])
    first = run_daemon(daemons, cfg)
    second = subprocess.run(
        [*OUTER, BINFMTD, "--sandbox", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert second.returncode == Exit.ALREADY_RUNNING, second.stderr
    assert f"another binfmtd (pid {first.pid}) holds" in second.stderr
    assert first.get("/v1/health")[1]["ok"]


def test_stale_socket_of_a_killed_daemon_is_recovered(
    daemons: list[SandboxDaemon], tmp_path: Path
) -> None:
    """kill -9 leaves the socket file; the next daemon removes it and serves."""
    cfg = daemon_config(tmp_path, arches=["s390x"])
    first = run_daemon(daemons, cfg)
    first.kill()
    assert os.path.exists(first.socket)
    second = run_daemon(daemons, cfg)
    assert second.events("stale_socket_removed")
    assert second.status()["daemon"]["pid"] == second.pid


def test_missing_worker_binary_is_fatal_for_the_worker_only(
    daemons: list[SandboxDaemon], tmp_path: Path
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

    worker = wait_for(fatal, 15, "the worker to be FATAL")
    assert "/nonexistent/buildkitd" in worker["last_error"]
    assert "not an executable" in worker["last_error"]
    assert daemon.get("/v1/health")[1]["ok"]
    assert daemon.status()["worker"]["state"].upper() == "FATAL"
