"""End to end, real kernel: each distribution layout provisions and verifies; trust is enforced.

`binfmtd --oneshot` runs in a private binfmt_misc (sandbox_sh). For the installed layouts the
sandbox's mount namespace shows the distribution's files where the distribution puts them: an
overlay adds Debian 13's /usr/bin (qemu-user + transitional qemu-user-static, unpacked by
`dpkg --root`) to /usr/bin, and that root's dpkg database is bound over /var/lib/dpkg, so
`source: auto` and `dpkg-query -S` see exactly what a Debian 13 host has.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import Trixie, write_config
from daemonutil import SandboxSh
from test_provision import installed_names, provision

from binfmtd.preflight import Exit

ARCHES = ["aarch64", "s390x"]


def debian13_host(trixie: Trixie) -> str:
    """sandbox_sh set-up: this namespace's /usr/bin and dpkg database are Debian 13's."""
    return (
        f"mount -t overlay overlay -o lowerdir={trixie.usr_bin}:/usr/bin /usr/bin\n"
        f"mount --bind {trixie.dpkg_admin} /var/lib/dpkg\n"
    )


def state_of(text: str) -> dict[str, Any]:
    """The state file's emulators."""
    emulators: dict[str, Any] = json.loads(text)["emulators"]
    return emulators


def deb_version(deb: Path) -> str:
    """The package version in a Debian file name (`%3a` is the epoch colon)."""
    return deb.name.split("_")[1].replace("%3a", ":")


def assert_verified(run: Any) -> None:
    """Exit 0, and both arches registered with our interpreter."""
    assert run.code == Exit.OK, run.stderr
    assert sorted(run.entries) == [f"qemu-{a}" for a in ARCHES], run.entries


def test_debian13_installed_layout_with_auto_and_all_arches(
    sandbox_sh: SandboxSh, tmp_path: Path, trixie: Trixie
) -> None:
    """Debian 13 host (qemu-user + transitional qemu-user-static), default `auto` and `all`:
    /usr/bin is found, qemu-A-static -> qemu-A followed, every arch QEMU 10 has (not cris,
    nios2) registered and verified, exit 0; the state records qemu-user and its version."""
    from binfmtd import arch as archmod

    cfg = write_config(tmp_path, arches=["all"], source={"kind": "auto"})
    try:
        _, (run,) = provision(
            sandbox_sh, tmp_path, cfg, before=debian13_host(trixie), args="--json"
        )
    finally:
        shutil.rmtree(tmp_path / "qemu", ignore_errors=True)  # ~30 emulators: ~450 MB
    assert run.code == Exit.OK, run.stderr
    rows = {row["arch"]: row for row in json.loads(run.stdout)["arches"]}
    native = {"x86_64", "i386"}
    expected = {r.name for r in archmod.CATALOG} - {"cris", "nios2"} - native
    assert set(rows) == expected
    assert {row["state"] for row in rows.values()} == {"verified"}, rows
    assert sorted(run.entries) == sorted(archmod.BY_NAME[a].entry_name for a in expected)
    version = deb_version(trixie.qemu_user_deb)
    for arch, record in state_of(run.state).items():
        assert record["source"] == "auto:/usr/bin"
        assert record["origin"] == f"/usr/bin/qemu-{arch}"
        assert (record["package"], record["package_version"]) == ("qemu-user", version)
        assert record["version"].startswith(f"qemu-{arch} version 10.0")


def test_debian13_directory_source(sandbox_sh: SandboxSh, tmp_path: Path, trixie: Trixie) -> None:
    """source.kind directory at Debian 13's unpacked usr/bin provisions and verifies."""
    source = {"kind": "directory", "path": str(trixie.usr_bin)}
    cfg = write_config(tmp_path, arches=ARCHES, source=source)
    _, (run,) = provision(sandbox_sh, tmp_path, cfg)
    assert_verified(run)
    for arch, record in state_of(run.state).items():
        assert record["origin"] == f"{trixie.usr_bin}/qemu-{arch}"


def test_debian13_deb_source(sandbox_sh: SandboxSh, tmp_path: Path, trixie: Trixie) -> None:
    """source.kind deb with Debian 13's qemu-user .deb provisions and verifies; package and
    version come from the .deb's control file."""
    source = {"kind": "deb", "path": str(trixie.qemu_user_deb)}
    cfg = write_config(tmp_path, arches=ARCHES, source=source)
    _, (run,) = provision(sandbox_sh, tmp_path, cfg)
    assert_verified(run)
    for arch, record in state_of(run.state).items():
        assert record["origin"] == f"{trixie.qemu_user_deb}:usr/bin/qemu-{arch}"
        assert record["package"] == "qemu-user"
        assert record["package_version"] == deb_version(trixie.qemu_user_deb)


def test_debian13_transitional_deb_is_a_clear_error(
    sandbox_sh: SandboxSh, tmp_path: Path, trixie: Trixie
) -> None:
    """Debian 13's qemu-user-static .deb (links only): exit 1 naming qemu-user, nothing done."""
    source = {"kind": "deb", "path": str(trixie.qemu_user_static_deb)}
    cfg = write_config(tmp_path, arches=["aarch64"], source=source)
    _, (run,) = provision(sandbox_sh, tmp_path, cfg)
    assert run.code == Exit.ARCH_FAILED
    assert "transitional package of links): use the qemu-user .deb" in run.stderr
    assert run.entries == {}
    assert installed_names(tmp_path) == []


def test_debian12_layout_with_auto(sandbox_sh: SandboxSh, tmp_path: Path, qemu_dir: Path) -> None:
    """Debian 12 / Ubuntu / Fedora layout (regular qemu-A-static files) found by `auto`."""
    cfg = write_config(tmp_path, arches=ARCHES, source={"kind": "auto"})
    before = f"mount -t overlay overlay -o lowerdir={qemu_dir}:/usr/bin /usr/bin\n"
    _, (run,) = provision(sandbox_sh, tmp_path, cfg, before=before)
    assert_verified(run)
    for arch, record in state_of(run.state).items():
        assert record["origin"] == f"/usr/bin/qemu-{arch}-static"


# ---------------------------------------------------------------- trust (issue 11, item 2a)


@pytest.mark.parametrize("what", ["directory", "file", "deb"])
def test_user_controlled_source_is_refused_and_nothing_runs(
    sandbox_sh: SandboxSh, tmp_path: Path, qemu_dir: Path, qemu_deb: Path, what: str
) -> None:
    """A source a non-root user could have changed (directory, a file in it, a .deb): exit 1,
    the message names the path and the chown/chmod to run, nothing installed (so nothing of
    it ever executed, not even --version) and nothing registered."""
    src = tmp_path / "src"
    src.mkdir()
    if what == "deb":
        target = src / "qemu.deb"
        shutil.copyfile(qemu_deb, target)
        source = {"kind": "deb", "path": str(target)}
    else:
        shutil.copyfile(qemu_dir / "qemu-aarch64-static", src / "qemu-aarch64-static")
        target = src if what == "directory" else src / "qemu-aarch64-static"
        source = {"kind": "directory", "path": str(src)}
    os.chown(target, 1000, 1000)
    cfg = write_config(tmp_path, arches=["aarch64"], source=source)
    _, (run,) = provision(sandbox_sh, tmp_path, cfg)
    assert run.code == Exit.ARCH_FAILED
    # uid 1000 is not mapped in the sandbox's user namespace: it shows as the overflow uid
    assert f"{target} is writable by a non-root user (owner uid 65534" in run.stderr
    assert f"chown root: {target} && chmod go-w {target}" in run.stderr
    assert run.entries == {}
    assert installed_names(tmp_path) == []
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("size", [b"4x", b"-60"])
def test_corrupt_deb_is_an_error_row_not_a_crash(
    sandbox_sh: SandboxSh, tmp_path: Path, size: bytes
) -> None:
    """A .deb with a bad ar size: exit 1 with the per-arch error, no traceback, no hang."""
    from test_deb import GOOD, package

    bad = tmp_path / "bad.deb"
    bad.write_bytes(package(GOOD, sizes={"control.tar.gz": size}))
    cfg = write_config(tmp_path, arches=["aarch64"], source={"kind": "deb", "path": str(bad)})
    _, (run,) = provision(sandbox_sh, tmp_path, cfg)
    assert run.code == Exit.ARCH_FAILED
    assert f"bad size field {size.decode()!r}" in run.stderr
    assert "Traceback" not in run.stderr
