"""Named sandboxes (issue 12): side by side, each in its own directories, nothing left behind.

The daemon tests use the real default sandbox paths (/run/binfmtd-sandbox/NAME and
/var/lib/binfmtd-sandbox/NAME) under names unique to the test, and check that the host's
sandbox directories hold exactly what they held before.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import daemonutil as du
import pytest
import yaml
from conftest import Cache

from binfmtd import ns


def test_names_are_checked_and_defaults_do_not_collide() -> None:
    """NAME is a plain file name; a bare --sandbox is oneshot-PID for --oneshot, else default."""
    assert ns.sandbox_name("ci-1.a_b") == "ci-1.a_b"
    for bad in ("", "../x", "a/b", ".hidden", "-x", "x" * 65):
        with pytest.raises(ValueError, match="bad sandbox name"):
            ns.sandbox_name(bad)
    assert ns.default_sandbox_name(oneshot=True, pid=42) == "oneshot-42"
    assert ns.default_sandbox_name(oneshot=False, pid=42) == "default"
    dirs = ns.SandboxDirs("ci")
    assert (dirs.runtime, dirs.state) == ("/run/binfmtd-sandbox/ci", "/var/lib/binfmtd-sandbox/ci")


def test_bad_sandbox_name_is_a_usage_error() -> None:
    """--sandbox=../x is refused as a usage error with the rule, before anything is created."""
    done = du.run([du.BINFMTD, "--sandbox=../x", "--oneshot"], 30)
    assert done.returncode in (2, 64), done.stderr  # argparse's usage exit code
    assert "bad sandbox name" in done.stderr


def host_sandbox_dirs() -> dict[str, list[str]]:
    """What the host's sandbox parent directories hold (absent: None-like empty marker)."""
    out = {}
    for parent in (ns.SANDBOX_RUNTIME, ns.SANDBOX_STATE):
        out[parent] = sorted(os.listdir(parent)) if os.path.isdir(parent) else ["<absent>"]
    return out


def sandbox_config(tmp: Path, cache: Cache) -> Path:
    """Default paths (so they move into the sandbox's directories), one arch, no socket group."""
    body = {
        "arches": ["aarch64"],
        "source": {"kind": "directory", "path": str(cache.qemu_dir)},
        "reconcile_interval_s": 0.2,
        "log": {"level": "info", "format": "json"},
        "api": {"group": None},
    }
    path = tmp / "binfmtd.yaml"
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    path.chmod(0o644)
    return path


@pytest.fixture
def name() -> Iterator[str]:
    """A sandbox name unique to this test run."""
    yield f"pytest-{os.getpid()}"


def start_named(cfg: Path, name: str) -> subprocess.Popen[str]:
    """`binfmtd --sandbox=NAME` (in an outer user namespace, as the other daemon tests)."""
    return subprocess.Popen(
        [*du.OUTER, du.BINFMTD, f"--sandbox={name}", "--config", str(cfg)],
        env=du.CLEAN_ENV,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_sandboxes_side_by_side_and_nothing_left(
    tmp_path: Path, cache: Cache, name: str
) -> None:
    """A named daemon runs; a bare --sandbox one-shot (the demo's call) runs beside it; a
    second daemon of the same name is refused naming the sandbox; all exits leave nothing."""
    before = host_sandbox_dirs()
    cfg = sandbox_config(tmp_path, cache)
    sock = f"{ns.SANDBOX_RUNTIME}/{name}/binfmtd.sock"
    daemon = start_named(cfg, name)
    try:
        du.wait_until(
            "the sandbox daemon's answer",
            lambda: daemon.poll() is None and du.ctl(sock, "check", timeout=5).returncode == 0,
            60,
        )
        demo = du.run([*du.OUTER, du.BINFMTD, "--oneshot", "--sandbox", "--config", str(cfg)], 120)
        assert demo.returncode == 0, demo.stderr
        again = du.run([*du.OUTER, du.BINFMTD, f"--sandbox={name}", "--config", str(cfg)], 60)
        assert again.returncode == 71, again.stderr
        assert f"it is sandbox '{name}' (binfmtd --sandbox={name})" in again.stderr
        assert "another name (--sandbox=NAME)" in again.stderr
        assert "systemctl" not in again.stderr
        assert du.ctl(sock, "check", timeout=5).returncode == 0  # the refused run removed nothing
    finally:
        daemon.terminate()
        _, err = daemon.communicate(timeout=30)
    assert daemon.returncode == 0, err
    assert host_sandbox_dirs() == before
