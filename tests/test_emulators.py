"""Installing emulators: checks, atomic writes, trust of the install dir, the state file."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from binfmtd import emulators
from binfmtd.emulators import Installed, InstallError

X86_64 = 62


def sha256(path: Path) -> str:
    """The hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def install_dir(tmp_path: Path) -> Path:
    """A fresh, trusted (root-owned 0755) install directory."""
    path = tmp_path / "qemu"
    emulators.ensure_install_dir(str(path))
    return path


def install_file(source: Path, dest: Path, arch: str = "aarch64") -> tuple[str, str]:
    """install_stream from a file on disk."""
    with source.open("rb") as stream:
        return emulators.install_stream(stream, arch, str(dest), X86_64)


def test_install_is_complete_root_owned_0755_and_checksummed(
    qemu_dir: Path, tmp_path: Path
) -> None:
    """A real static QEMU lands at qemu-<arch>, 0755 root:root, identical, sha256 returned."""
    dest = install_dir(tmp_path)
    source = qemu_dir / "qemu-aarch64-static"
    path, digest = install_file(source, dest)
    st = os.stat(path)
    assert path == str(dest / "qemu-aarch64")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0)
    assert digest == sha256(source) == sha256(Path(path))
    assert os.listdir(dest) == ["qemu-aarch64"]
    assert emulators.sha256_of(path) == digest
    assert (emulators.qemu_version(path) or "").startswith("qemu-aarch64 version ")


@pytest.mark.parametrize(
    ("make_bad", "why"),
    [
        (lambda q, bb: Path(shutil.which("ls") or "/bin/ls").read_bytes(), "dynamically linked"),
        (lambda q, bb: bb.read_bytes(), "ELF machine 183"),
        (lambda q, bb: q.read_bytes()[:100_000], "truncated"),
        (lambda q, bb: b"#!/bin/sh\n" * 10, "not an ELF file"),
    ],
    ids=["dynamic", "wrong-machine", "truncated", "not-elf"],
)
def test_unusable_binary_never_reaches_the_final_name(
    qemu_dir: Path,
    busybox: Callable[[str], Path],
    tmp_path: Path,
    make_bad: Callable[[Path, Path], bytes],
    why: str,
) -> None:
    """A bad 'QEMU' is refused with the reason; the good one already there stays; no temp left."""
    dest = install_dir(tmp_path)
    good_path, good_digest = install_file(qemu_dir / "qemu-aarch64-static", dest)
    bad = make_bad(qemu_dir / "qemu-aarch64-static", busybox("arm64"))
    with pytest.raises(InstallError, match=f"qemu-aarch64 from the source is unusable: .*{why}"):
        emulators.install_stream(io.BytesIO(bad), "aarch64", str(dest), X86_64)
    assert os.listdir(dest) == ["qemu-aarch64"]
    assert sha256(Path(good_path)) == good_digest


def test_failed_install_into_empty_dir_leaves_it_empty(tmp_path: Path) -> None:
    """Nothing at all (no final file, no temp file) remains after a refused install."""
    dest = install_dir(tmp_path)
    with pytest.raises(InstallError):
        install_file(Path(shutil.which("ls") or "/bin/ls"), dest)
    assert os.listdir(dest) == []


def test_leftover_temp_files_are_cleaned(tmp_path: Path) -> None:
    """Temp files of a killed install are removed when the directory is next prepared."""
    dest = install_dir(tmp_path)
    (dest / f"{emulators.TEMP_PREFIX}abc").write_bytes(b"partial")
    (dest / "qemu-keep").write_bytes(b"kept")
    emulators.ensure_install_dir(str(dest))
    assert os.listdir(dest) == ["qemu-keep"]


def test_state_file_records_sha256_atomically(qemu_dir: Path, tmp_path: Path) -> None:
    """write_state writes valid JSON (0644, version 1) with each sha256; read_state reads it."""
    dest = install_dir(tmp_path)
    path, digest = install_file(qemu_dir / "qemu-aarch64-static", dest)
    record = Installed("aarch64", path, digest, "v", "directory:x", "1:2:3:4", 1.5)
    state = tmp_path / "state" / "state.json"
    emulators.write_state(str(state), {"aarch64": record})
    data = json.loads(state.read_text(encoding="utf-8"))
    assert data["version"] == 1
    assert data["emulators"]["aarch64"]["sha256"] == digest == sha256(Path(path))
    assert stat.S_IMODE(state.stat().st_mode) == 0o644
    assert os.listdir(state.parent) == ["state.json"]
    assert emulators.read_state(str(state)) == {"aarch64": record}


@pytest.mark.parametrize("body", [b"", b"{not json", b'{"emulators": {"x": {"arch": 1}}}', b"[]"])
def test_unreadable_state_trusts_nothing(tmp_path: Path, body: bytes) -> None:
    """A corrupt or foreign state file means no emulator is trusted (it is not an error)."""
    state = tmp_path / "state.json"
    state.write_bytes(body)
    assert emulators.read_state(str(state)) == {}
    assert emulators.read_state(str(tmp_path / "missing.json")) == {}


@pytest.mark.parametrize("target", ["dir", "parent"])
def test_group_writable_install_dir_refused(qemu_dir: Path, tmp_path: Path, target: str) -> None:
    """A group-writable install directory (or parent) is refused with the fix; nothing installed."""
    parent = tmp_path / "parent"
    dest = parent / "qemu"
    dest.mkdir(parents=True)
    (dest if target == "dir" else parent).chmod(0o775)
    with pytest.raises(InstallError, match="writable by a non-root user") as info:
        emulators.ensure_install_dir(str(dest))
    assert "chmod go-w" in str(info.value)
    assert os.listdir(dest) == []


def test_non_root_owned_parent_refused(tmp_path: Path) -> None:
    """A parent owned by another user could be renamed away: refused."""
    parent = tmp_path / "parent"
    parent.mkdir()
    os.chown(parent, 1000, 1000)
    with pytest.raises(InstallError, match="owner uid 1000"):
        emulators.ensure_install_dir(str(parent / "qemu"))


def test_sticky_world_writable_parent_accepted(tmp_path: Path) -> None:
    """A sticky parent such as /tmp is fine: only root can rename root's entries there."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    emulators.ensure_install_dir(str(sticky / "qemu"))
    assert stat.S_IMODE((sticky / "qemu").stat().st_mode) == 0o755


@pytest.mark.parametrize("target", ["dir", "parent"])
def test_symlinked_install_dir_refused(tmp_path: Path, target: str) -> None:
    """An install directory that is, or sits under, a symbolic link is refused."""
    real = tmp_path / "real"
    (real / "qemu").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real / "qemu" if target == "dir" else real)
    path = link if target == "dir" else link / "qemu"
    with pytest.raises(InstallError, match="is a symbolic link"):
        emulators.ensure_install_dir(str(path))


def test_sha256_of_distrusts_modifiable_files(qemu_dir: Path, tmp_path: Path) -> None:
    """sha256_of returns None for group-writable, hard-linked, symlinked or foreign-owned files."""
    dest = install_dir(tmp_path)
    path, digest = install_file(qemu_dir / "qemu-s390x-static", dest, "s390x")
    assert emulators.sha256_of(path) == digest
    os.chmod(path, 0o775)
    assert emulators.sha256_of(path) is None
    os.chmod(path, 0o755)
    os.link(path, tmp_path / "hardlink")
    assert emulators.sha256_of(path) is None
    os.unlink(tmp_path / "hardlink")
    (tmp_path / "symlink").symlink_to(path)
    assert emulators.sha256_of(str(tmp_path / "symlink")) is None
    os.chown(path, 1000, 0)
    assert emulators.sha256_of(path) is None
    assert emulators.sha256_of(str(tmp_path / "absent")) is None
