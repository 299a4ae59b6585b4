"""`binfmtd --oneshot --sandbox` ends cleanly however it ends: stopped by a signal (its
sandbox directories removed, exit 128 + signal), killed earlier (the next run sweeps what it
left), stdout closed (exit 141, quiet), nothing to provision or a command skipped (one line
that says so). Every run is in its own private binfmt_misc (`--sandbox`, inside an outer user
namespace)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import _find_cache
from daemonutil import BINFMTD

from binfmtd import ns

OUTER = ["unshare", "--user", "--map-root-user", "--mount"]


def sandbox_config(tmp: Path, **overrides: Any) -> Path:
    """A config whose paths stay at their defaults, so --sandbox moves them into its own
    /run/binfmtd-sandbox/NAME and /var/lib/binfmtd-sandbox/NAME."""
    body: dict[str, Any] = {
        "arches": ["aarch64"],
        "source": {"kind": "directory", "path": str(_find_cache().qemu_dir)},
        "log": {"level": "warning"},
        "api": {"group": None},
    }
    body.update(overrides)
    path = tmp / "e.yaml"
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    path.chmod(0o644)
    return path


def argv(cfg: Path, *extra: str) -> list[str]:
    return [*OUTER, BINFMTD, "--oneshot", "--sandbox", "--config", str(cfg), *extra]


def run(cfg: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv(cfg, *extra), capture_output=True, text=True, timeout=120, check=False
    )


def wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    """Poll until `path` exists (the command started); fail if binfmtd ended first."""
    deadline = time.monotonic() + 120
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the command never started"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_removes_the_sandbox_and_exits_128_plus_sig(tmp_path: Path, sig: int) -> None:
    """`timeout 9 binfmtd --oneshot --sandbox ... -- sleep 30`: the signal ends binfmtd (and the
    command) with exit 128+sig, and neither sandbox directory is left behind."""
    mark = tmp_path / "started"
    cfg = sandbox_config(tmp_path)
    proc = subprocess.Popen(
        argv(cfg, "--", "sh", "-c", f"touch {mark}; exec sleep 30"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    dirs = ns.SandboxDirs(f"oneshot-{proc.pid}")  # unshare execs binfmtd: same pid
    try:
        wait_for(mark, proc)
        assert os.path.isdir(dirs.state)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, err
    assert f"stopped by {signal.Signals(sig).name}" in err
    assert "Traceback" not in err
    assert not os.path.exists(dirs.runtime) and not os.path.exists(dirs.state)


def test_stale_oneshot_dirs_are_swept_live_ones_kept(tmp_path: Path) -> None:
    """A run killed with SIGKILL leaves oneshot-PID directories; the next sandbox run removes
    those whose process is gone and whose lock is free, and keeps a live run's."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = ns.SandboxDirs(f"oneshot-{gone.pid}")
    live = ns.SandboxDirs(f"oneshot-{os.getpid()}")
    try:
        for dirs in (stale, live):
            os.makedirs(dirs.runtime, exist_ok=True)
            Path(dirs.runtime, "binfmtd.lock").write_text("1\n")
            os.makedirs(f"{dirs.state}/qemu", exist_ok=True)
            Path(dirs.state, "qemu", "qemu-aarch64").write_bytes(b"x" * 1024)
        result = run(sandbox_config(tmp_path))
        assert result.returncode == 0, result.stderr
        assert not os.path.exists(stale.runtime) and not os.path.exists(stale.state)
        assert os.path.isdir(live.runtime) and os.path.isdir(live.state)
    finally:
        stale.remove()
        live.remove()


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_closed_stdout_is_exit_141_quietly(tmp_path: Path, extra: list[str]) -> None:
    """`binfmtd --oneshot --sandbox [--json] | true`: exit 141, no "internal error"."""
    proc = subprocess.Popen(
        argv(sandbox_config(tmp_path), *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert "internal error" not in err and "BrokenPipe" not in err


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            {"arches": ["arm64"], "exclude": ["arm64"]},
            "no architectures to provision: aarch64 excluded by `exclude`",
        ),
        (
            {"arches": ["amd64"]},
            "no architectures to provision: x86_64 is this host's native architecture",
        ),
    ],
)
def test_empty_arch_set_says_so(tmp_path: Path, overrides: dict[str, Any], line: str) -> None:
    """An arch set that ends up empty is not a silent empty table: one warning line, exit 0."""
    if os.uname().machine != "x86_64":
        pytest.skip("the native-arch example is written for an x86_64 host")
    result = run(sandbox_config(tmp_path, **overrides))
    assert result.returncode == 0, result.stderr
    assert f"binfmtd: warning: {line}" in result.stderr


def test_skipped_command_is_named(tmp_path: Path) -> None:
    """`--oneshot -- CMD` with a failed arch: CMD is not run, and one line says so and why."""
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = sandbox_config(tmp_path, source={"kind": "directory", "path": str(empty)})
    mark = tmp_path / "ran"
    result = run(cfg, "--", "touch", str(mark))
    assert result.returncode == 1, result.stderr
    assert not mark.exists()
    assert "binfmtd: not running touch: not every architecture" in result.stderr


@pytest.mark.parametrize(
    ("command", "code", "line"),
    [
        (["sh", "-c", 'kill -KILL "$$"'], 137, "binfmtd: sh was killed by SIGKILL"),
        (["sh", "-c", 'kill -SEGV "$$"'], 139, "binfmtd: sh was killed by SIGSEGV"),
        (["sh", "-c", "exit 7"], 7, ""),
        (["/proc/self/status"], 126, "binfmtd: cannot run /proc/self/status: Permission denied"),
        (["/nonexistent/cmd"], 127, "binfmtd: cannot run /nonexistent/cmd: No such file"),
    ],
)
def test_command_exit_codes_are_a_shells(
    tmp_path: Path, command: list[str], code: int, line: str
) -> None:
    """`--oneshot -- CMD`: binfmtd exits as a shell would for CMD (a build step's crash under
    QEMU is SIGSEGV: 139), and says which signal killed it. Before, a CMD killed by signal N
    made binfmtd exit 256 - N (247 for SIGKILL), which no caller reads as a signal, and a CMD
    that exists but cannot be run gave 127 (not found) instead of 126."""
    result = run(sandbox_config(tmp_path), "--", *command)
    assert result.returncode == code, result.stderr
    assert line in result.stderr


def test_a_lock_file_that_cannot_be_opened_is_a_clear_refusal(tmp_path: Path) -> None:
    """lock_file naming something binfmtd cannot open as its lock (here a directory; also a
    running program, ETXTBSY, or a read-only filesystem): exit 78 with one line naming
    lock_file and why. Before, binfmtd died with a Python traceback."""
    taken = tmp_path / "a-directory"
    taken.mkdir()
    result = run(sandbox_config(tmp_path, lock_file=str(taken)))
    assert result.returncode == 78, result.stderr
    assert f"lock_file {taken}: cannot open it: Is a directory" in result.stderr
    assert "Traceback" not in result.stderr
