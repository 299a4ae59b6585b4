"""Shared fixtures: the real foreign parts in the cache, private binfmt_misc sandboxes, configs.

Nothing here ever touches the host's global binfmt_misc: everything that registers runs in a
new user + mount namespace with its own instance, and a session guard proves the host's state
(mounted or not, which entries) is the same after the suite as before it.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import daemonutil as du
import pytest
import yaml
from daemonutil import BINFMTD, REPO, SandboxSh
from hypothesis import settings

# Property tests check answers, not speed: on a loaded 2-core CI machine a per-example
# deadline only makes them flaky (speed targets live in scripts/bench).
settings.register_profile("binfmtd", deadline=None)
settings.load_profile("binfmtd")

GLOBAL_BINFMT = du.ENTRIES
PYTHON = sys.executable


@dataclass(frozen=True)
class Cache:
    """Where `./scripts/setup` put the real foreign parts."""

    root: Path
    qemu_dir: Path
    qemu_deb: Path
    binfmt_d: Path
    busybox_root: Path

    def busybox(self, debarch: str) -> Path:
        """The static busybox for a Debian architecture name (arm64, armhf, ...)."""
        return self.busybox_root / debarch / "bin" / "busybox"


def _find_cache() -> Cache:
    root = Path(os.environ.get("BINFMTD_CACHE", REPO / "cache"))
    debs = sorted((root / "debs").glob("qemu-user-static_*.deb"))
    cache = Cache(
        root=root,
        qemu_dir=root / "qemu" / "usr" / "bin",
        qemu_deb=debs[0] if debs else root / "debs" / "qemu-user-static_MISSING.deb",
        binfmt_d=root / "qemu" / "usr" / "lib" / "binfmt.d",
        busybox_root=root / "busybox",
    )
    needed = [
        cache.qemu_deb,
        cache.qemu_dir / "qemu-aarch64-static",
        cache.binfmt_d / "qemu-aarch64.conf",
        cache.busybox("arm64"),
    ]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        pytest.fail(
            f"the test cache at {root} is incomplete (missing {', '.join(missing)}): "
            "run ./scripts/setup (or point BINFMTD_CACHE at a prepared cache)",
            pytrace=False,
        )
    return cache


@pytest.fixture(scope="session")
def cache() -> Cache:
    """The prepared cache; the suite fails (never skips) when it is missing."""
    return _find_cache()


@pytest.fixture(scope="session")
def qemu_dir(cache: Cache) -> Path:
    """The unpacked qemu-user-static binaries (usr/bin of the .deb)."""
    return cache.qemu_dir


@pytest.fixture(scope="session")
def qemu_deb(cache: Cache) -> Path:
    """Debian's qemu-user-static .deb."""
    return cache.qemu_deb


@dataclass(frozen=True)
class Trixie:
    """Debian 13's real packages, from `./scripts/setup`: both .debs, and a private root where
    `dpkg --root --unpack` put them (the installed layout, with its dpkg database)."""

    root: Path
    qemu_user_deb: Path
    qemu_user_static_deb: Path

    @property
    def usr_bin(self) -> Path:
        """The installed layout: qemu-<arch> files and qemu-<arch>-static -> qemu-<arch>."""
        return self.root / "usr" / "bin"

    @property
    def dpkg_admin(self) -> Path:
        """The dpkg database that knows both packages."""
        return self.root / "var" / "lib" / "dpkg"


@pytest.fixture(scope="session")
def trixie(cache: Cache) -> Trixie:
    """Debian 13's qemu-user and qemu-user-static; skips (with the fix) when not fetched."""
    base = cache.root / "trixie"
    debs = {p.name.split("_")[0]: p for p in sorted((base / "debs").glob("*.deb"))}
    found = Trixie(base / "root", debs.get("qemu-user", base), debs.get("qemu-user-static", base))
    needed = [found.qemu_user_deb, found.qemu_user_static_deb, found.usr_bin / "qemu-aarch64"]
    if not (base / ".ready").exists() or not all(p.is_file() for p in needed):
        pytest.skip(f"Debian 13 packages are not in {base}: run ./scripts/setup")
    return found


@pytest.fixture(scope="session")
def busybox(cache: Cache) -> Callable[[str], Path]:
    """busybox(debarch) -> the static busybox of that Debian architecture."""

    def find(debarch: str) -> Path:
        path = cache.busybox(debarch)
        if not path.is_file():
            pytest.fail(f"{path} is missing: run ./scripts/setup", pytrace=False)
        return path

    return find


# ---------------------------------------------------------------- the host guard


def _global_binfmt_state() -> tuple[str | None, dict[str, str]]:
    """(filesystem type mounted at the global path per mountinfo, entry texts if mounted)."""
    fstype = None
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) > 4 and fields[4] == GLOBAL_BINFMT:
                fstype = right.split()[0] if right else None
    entries: dict[str, str] = {}
    if fstype == "binfmt_misc":
        for name in sorted(os.listdir(GLOBAL_BINFMT)):
            if name != "register":
                entries[name] = Path(GLOBAL_BINFMT, name).read_text(encoding="latin-1")
    return fstype, entries


@pytest.fixture(scope="session", autouse=True)
def host_binfmt_untouched() -> Iterator[None]:
    """Records the host's global binfmt_misc and asserts the suite left it exactly as it was."""
    before = _global_binfmt_state()
    yield
    after = _global_binfmt_state()
    assert after == before, (
        f"the suite changed the host's global binfmt_misc: before {before!r}, after {after!r}"
    )


# ---------------------------------------------------------------- sandboxes and configs

SANDBOX_PRELUDE = f"""set -euo pipefail
mount --make-rprivate /
mount -t binfmt_misc binfmt_misc {GLOBAL_BINFMT}
"""


@pytest.fixture
def sandbox_sh(cache: Cache) -> SandboxSh:
    """sandbox_sh(script, timeout=120, env=None): bash in a new userns+mountns, private binfmt_misc.

    The script sees $REPO, $CACHE, $QEMU_DIR, $QEMU_DEB, $BINFMTD and $PYTHON, runs with
    `set -euo pipefail`, and finds a fresh binfmt_misc instance at /proc/sys/fs/binfmt_misc.
    """

    def run(
        script: str, timeout: float = 120, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        full_env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LC_ALL": "C.UTF-8",
            "HOME": "/root",
            "REPO": str(REPO),
            "CACHE": str(cache.root),
            "QEMU_DIR": str(cache.qemu_dir),
            "QEMU_DEB": str(cache.qemu_deb),
            "BINFMTD": BINFMTD,
            "PYTHON": PYTHON,
            **(env or {}),
        }
        return du.run([*du.OUTER, "bash", "-c", SANDBOX_PRELUDE + script], timeout, full_env)

    return run


def write_config(tmp_dir: Path, **overrides: Any) -> Path:
    """A YAML config with every path under `tmp_dir`, the cache's qemu directory as source.

    `overrides` replace top-level keys (a dict value replaces the whole section). The install
    directory's parents must be root-owned and not group/world-writable (pytest's tmp_path is).
    """
    cache = _find_cache()
    body: dict[str, Any] = {
        "install_dir": str(tmp_dir / "qemu"),
        "state_file": str(tmp_dir / "state" / "state.json"),
        "lock_file": str(tmp_dir / "run" / "binfmtd.lock"),
        "source": {"kind": "directory", "path": str(cache.qemu_dir)},
        "log": {"level": "warning"},
        "api": {"socket": str(tmp_dir / "run" / "binfmtd.sock"), "group": None},
    }
    body.update(overrides)
    path = tmp_dir / "binfmtd.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    path.chmod(0o644)
    return path


def daemon_config(tmp: Path, **overrides: Any) -> Path:
    """A daemon config: json logs at info, 0.2 s reconcile, two arches unless overridden."""
    base: dict[str, Any] = {
        "arches": ["aarch64", "s390x"],
        "reconcile_interval_s": 0.2,
        "log": {"level": "info", "format": "json"},
    }
    return write_config(tmp, **(base | overrides))


# ---------------------------------------------------------------- running daemons


@pytest.fixture
def sock() -> Iterator[str]:
    """A socket path in a short, traversable directory under /tmp."""
    directory = du.sock_dir()
    yield os.path.join(directory, "api.sock")
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def daemons() -> Iterator[list[du.Daemon]]:
    """Daemons a test starts (`daemonutil.run_daemon`); each is stopped afterwards."""
    started: list[du.Daemon] = []
    yield started
    for daemon in started:
        daemon.close()


# ---------------------------------------------------------------- a real unprivileged user


@dataclass(frozen=True)
class LocalUser:
    """A system user (and its own group) made for one test; see the `local_user` fixture."""

    name: str
    uid: int
    gid: int

    def run(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `argv` as this user (no supplementary groups), stdin from /dev/null."""
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            user=self.uid,
            group=self.gid,
            extra_groups=[],
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def popen(self, argv: list[str]) -> subprocess.Popen[str]:
        """Start `argv` as this user in the background (the caller ends it)."""
        return subprocess.Popen(
            argv,
            text=True,
            user=self.uid,
            group=self.gid,
            extra_groups=[],
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def accounts(argv: list[str], *, gone_ok: bool = False) -> None:
    """Run a shadow-utils command, retrying while another process holds /etc/passwd's lock."""
    for _ in range(40):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode == 0 or (gone_ok and done.returncode == 6):  # 6: no such account
            return
        if "lock" not in done.stderr:
            break
        time.sleep(0.25)
    raise AssertionError(f"{' '.join(argv)} failed: {done.stderr}")


@pytest.fixture
def local_user() -> Iterator[LocalUser]:
    """An unprivileged local user with its own group, made for the test and removed after it."""
    name = f"bfmt-u{secrets.token_hex(3)}"
    accounts(
        ["useradd", "--system", "--no-create-home", "--user-group", "-s", "/usr/sbin/nologin", name]
    )
    try:
        entry = pwd.getpwnam(name)
        yield LocalUser(name, entry.pw_uid, entry.pw_gid)
    finally:
        accounts(["userdel", name], gone_ok=True)
        accounts(["groupdel", name], gone_ok=True)
