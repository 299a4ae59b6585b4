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
from typing import Any

import blake3
import pytest

from binfmtd import emulators
from binfmtd.emulators import Installed, InstallError

X86_64 = 62


def checksum(path: Path) -> str:
    """The checksum binfmtd records for a file: `blake3:<hex>`."""
    return "blake3:" + blake3.blake3(path.read_bytes()).hexdigest()


def install_dir(tmp_path: Path) -> Path:
    """A fresh, trusted (root-owned 0755) install directory."""
    path = tmp_path / "qemu"
    emulators.ensure_install_dir(str(path))
    return path


def install_file(
    source: Path, dest: Path, arch: str = "aarch64", *, link: bool = False
) -> tuple[str, str]:
    """install_stream from a file on disk (by hard link only when `link`): (path, checksum)."""
    written = install_written(source, dest, arch, link=link)
    return written.path, written.checksum


def install_written(
    source: Path,
    dest: Path,
    arch: str = "aarch64",
    *,
    link: bool = True,
    hashes: emulators.HashCache | None = None,
) -> emulators.Written:
    """install_stream from a file on disk, the whole result."""
    with source.open("rb") as stream:
        return emulators.install_stream(
            stream, arch, str(dest), X86_64, allow_link=link, hashes=hashes
        )


def test_install_is_complete_root_owned_0755_and_checksummed(
    qemu_dir: Path, tmp_path: Path
) -> None:
    """A real static QEMU lands at qemu-<arch>, 0755 root:root, identical, checksum returned."""
    dest = install_dir(tmp_path)
    source = qemu_dir / "qemu-aarch64-static"
    path, digest = install_file(source, dest)
    st = os.stat(path)
    assert path == str(dest / "qemu-aarch64")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0)
    assert digest == checksum(source) == checksum(Path(path))
    assert os.listdir(dest) == ["qemu-aarch64"]
    assert emulators.checksum_of(path) == digest
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
    assert checksum(Path(good_path)) == good_digest


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


def test_state_file_records_checksums_atomically(qemu_dir: Path, tmp_path: Path) -> None:
    """write_state writes valid JSON (0644, version 1) with each checksum; read_state reads it."""
    dest = install_dir(tmp_path)
    path, digest = install_file(qemu_dir / "qemu-aarch64-static", dest)
    record = Installed("aarch64", path, digest, "v", "directory:x", "1:2:3:4", 1.5)
    state = tmp_path / "state" / "state.json"
    emulators.write_state(str(state), {"aarch64": record})
    data = json.loads(state.read_text(encoding="utf-8"))
    assert data["version"] == 1
    assert data["emulators"]["aarch64"]["checksum"] == digest == checksum(Path(path))
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


def test_checksum_of_distrusts_modifiable_files(qemu_dir: Path, tmp_path: Path) -> None:
    """checksum_of is None for group-writable, hard-linked, symlinked or foreign-owned files."""
    dest = install_dir(tmp_path)
    path, digest = install_file(qemu_dir / "qemu-s390x-static", dest, "s390x")
    assert emulators.checksum_of(path) == digest
    os.chmod(path, 0o775)
    assert emulators.checksum_of(path) is None
    os.chmod(path, 0o755)
    os.link(path, tmp_path / "hardlink")
    assert emulators.checksum_of(path) is None
    os.unlink(tmp_path / "hardlink")
    (tmp_path / "symlink").symlink_to(path)
    assert emulators.checksum_of(str(tmp_path / "symlink")) is None
    os.chown(path, 1000, 0)
    assert emulators.checksum_of(path) is None
    assert emulators.checksum_of(str(tmp_path / "absent")) is None


def test_trusted_source_on_the_same_filesystem_is_installed_by_hard_link(
    qemu_dir: Path, tmp_path: Path
) -> None:
    """A root:root 0755 source beside the install dir: same inode, checksummed, version read."""
    source = tmp_path / "src" / "qemu-riscv64-static"
    source.parent.mkdir()
    shutil.copy2(qemu_dir / "qemu-riscv64-static", source)
    dest = install_dir(tmp_path)
    written = install_written(source, dest, "riscv64")
    assert written.method is emulators.Method.LINK
    assert os.stat(written.path).st_ino == source.stat().st_ino
    assert os.stat(written.path).st_nlink == 2
    assert written.checksum == checksum(source)
    assert written.version == emulators.qemu_version(written.path)
    inode = os.stat(written.path).st_ino
    assert emulators.checksum_of(written.path, linked_inode=inode) == written.checksum
    assert emulators.checksum_of(written.path) is None  # a copy must have one link
    assert emulators.checksum_of(written.path, linked_inode=inode + 1) is None
    again = install_written(source, dest, "riscv64")  # rename(2) onto the same inode
    assert again.method is emulators.Method.LINK
    assert os.listdir(dest) == ["qemu-riscv64"]


def test_package_manager_replacing_the_source_leaves_the_link_alone(
    qemu_dir: Path, tmp_path: Path
) -> None:
    """dpkg installs a new version by rename(2): the linked emulator keeps the old inode."""
    source = tmp_path / "src" / "qemu-riscv64-static"
    source.parent.mkdir()
    shutil.copy2(qemu_dir / "qemu-riscv64-static", source)
    dest = install_dir(tmp_path)
    written = install_written(source, dest, "riscv64")
    upgrade = source.with_name("qemu-riscv64-static.dpkg-new")
    shutil.copy2(qemu_dir / "qemu-s390x-static", upgrade)
    os.rename(upgrade, source)
    inode = os.stat(written.path).st_ino
    assert checksum(Path(written.path)) == written.checksum != checksum(source)
    assert emulators.checksum_of(written.path, linked_inode=inode) == written.checksum
    source.unlink()  # and removing the package does not remove the emulator
    assert emulators.checksum_of(written.path) == written.checksum


@pytest.mark.parametrize("mode", [0o775, 0o750, 0o4755])
def test_source_that_is_not_root_0755_is_copied_not_linked(
    qemu_dir: Path, tmp_path: Path, mode: int
) -> None:
    """A link would carry the source's mode: anything but root:root 0755 gets its own copy."""
    source = tmp_path / "src" / "qemu-riscv64-static"
    source.parent.mkdir()
    shutil.copy2(qemu_dir / "qemu-riscv64-static", source)
    source.chmod(mode)
    dest = install_dir(tmp_path)
    written = install_written(source, dest, "riscv64")
    st = os.stat(written.path)
    assert written.method in {emulators.Method.REFLINK, emulators.Method.COPY}
    assert st.st_ino != source.stat().st_ino and st.st_nlink == 1
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0)
    assert written.checksum == checksum(source) == emulators.checksum_of(written.path)


def test_copy_method_never_links(qemu_dir: Path, tmp_path: Path) -> None:
    """install_method: copy gives bytes of our own even from a linkable source."""
    dest = install_dir(tmp_path)
    written = install_written(qemu_dir / "qemu-aarch64-static", dest, link=False)
    assert written.method in {emulators.Method.REFLINK, emulators.Method.COPY}
    assert os.stat(written.path).st_nlink == 1
    assert emulators.checksum_of(written.path) == written.checksum


def test_source_bytes_are_read_once_per_identity(
    qemu_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hash cache skips re-reading an unchanged source; a rewritten one is read again."""
    reads = counting_reads(monkeypatch)
    source = tmp_path / "src" / "qemu-riscv64-static"
    source.parent.mkdir()
    shutil.copy2(qemu_dir / "qemu-riscv64-static", source)
    hashes = emulators.HashCache()
    first = install_written(source, install_dir(tmp_path), "riscv64", link=False, hashes=hashes)
    second = install_written(source, tmp_path / "qemu", "riscv64", link=False, hashes=hashes)
    assert len(reads) == 1 and first.checksum == second.checksum
    assert first.version is not None and second.version == first.version
    with source.open("r+b") as handle:  # same size, same inode, other bytes
        handle.seek(-1, os.SEEK_END)
        handle.write(b"\x01")
    third = install_written(source, tmp_path / "qemu", "riscv64", link=False, hashes=hashes)
    assert len(reads) == 2 and third.checksum == checksum(source) != first.checksum


def test_hash_cache_survives_in_the_state_file(qemu_dir: Path, tmp_path: Path) -> None:
    """write_state keeps the digest cache; read_hashes gives it back (garbage gives empty)."""
    hashes = emulators.HashCache()
    written = install_written(
        qemu_dir / "qemu-s390x-static", install_dir(tmp_path), "s390x", link=False, hashes=hashes
    )
    state = tmp_path / "state.json"
    emulators.write_state(str(state), {}, hashes=hashes)
    again = emulators.read_hashes(str(state))
    st = os.stat(qemu_dir / "qemu-s390x-static")
    assert again.get(st) == emulators.Digest(written.checksum, written.version)
    state.write_text('{"hashes": [1, 2]}', encoding="utf-8")
    assert emulators.read_hashes(str(state)).get(st) is None
    assert emulators.read_hashes(str(tmp_path / "missing.json")).get(st) is None


def counting_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch emulators._digest_fd to count how often a source is read; returns the counter."""
    reads: list[int] = []
    real = emulators._digest_fd

    def counting(fd: int, arch: str | None, *args: Any, **kwargs: Any) -> Any:
        reads.append(fd)
        return real(fd, arch, *args, **kwargs)

    monkeypatch.setattr(emulators, "_digest_fd", counting)
    return reads


def test_hash_cache_key_across_our_link_unlink_and_a_rewrite_with_restored_mtime(
    qemu_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache keeps ctime: a linked source is not read again while our link stands, is read
    again once the link is removed (ctime moved; stat cannot tell who moved it), and a rewrite
    in place with mtime restored by utimensat is never served the old checksum."""
    reads = counting_reads(monkeypatch)
    source = tmp_path / "src" / "qemu-riscv64-static"
    source.parent.mkdir()
    shutil.copy2(qemu_dir / "qemu-riscv64-static", source)
    hashes = emulators.HashCache()
    dest = install_dir(tmp_path)
    first = install_written(source, dest, "riscv64", hashes=hashes)
    assert first.method is emulators.Method.LINK and len(reads) == 1
    assert hashes.get(source.stat()) == emulators.Digest(first.checksum, first.version)
    os.unlink(first.path)  # the install dir emptied: the source's link count (ctime) changed
    assert hashes.get(source.stat()) is None
    second = install_written(source, dest, "riscv64", hashes=hashes)
    assert len(reads) == 2 and second.checksum == first.checksum
    os.unlink(second.path)
    before = source.stat()
    with source.open("r+b") as handle:  # same size, same inode, other bytes, mtime put back
        handle.seek(-1, os.SEEK_END)
        handle.write(b"\x02")
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = source.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    third = install_written(source, dest, "riscv64", hashes=hashes)
    assert len(reads) == 3 and third.checksum == checksum(source) != first.checksum


def test_state_file_from_before_blake3_still_verifies(qemu_dir: Path, tmp_path: Path) -> None:
    """An old record (`sha256`: bare hex) and old cache entries read as `sha256:<hex>`; the file
    still verifies with sha256 (no reinstall), a changed file does not, and a new write keeps
    the record's own algorithm."""
    dest = install_dir(tmp_path)
    path, new = install_file(qemu_dir / "qemu-s390x-static", dest, "s390x")
    old_hex = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    record = {
        "arch": "s390x",
        "path": path,
        "sha256": old_hex,
        "version": "v",
        "source": "directory:x",
        "source_id": "1:2",
        "installed_at": 1.5,
    }
    st = os.stat(path)
    identity = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    state = tmp_path / "state.json"
    doc = {"version": 1, "emulators": {"s390x": record}, "hashes": {identity: [old_hex, "v"]}}
    state.write_text(json.dumps(doc), encoding="utf-8")
    state.chmod(0o644)
    installed = emulators.read_state(str(state))["s390x"]
    assert installed.checksum == f"sha256:{old_hex}" and new.startswith("blake3:")
    assert emulators.matches(path, installed.checksum)
    assert emulators.read_hashes(str(state)).get(st) == emulators.Digest(installed.checksum, "v")
    emulators.write_state(str(state), {"s390x": installed})
    data = json.loads(state.read_text(encoding="utf-8"))["emulators"]["s390x"]
    assert data["checksum"] == f"sha256:{old_hex}" and "sha256" not in data
    os.chmod(path, 0o644)
    with open(path, "r+b") as handle:
        handle.write(b"\x7fELG")
    os.chmod(path, 0o755)
    assert not emulators.matches(path, installed.checksum)
    assert not emulators.matches(path, "md5:" + "0" * 32)  # an unknown algorithm never matches


def test_version_is_looked_for_after_the_code_only(qemu_dir: Path) -> None:
    """The QEMU version literal lies past the executable segment, where the scan starts: the
    version is still read from the bytes (nothing runs), and not found when searched before."""
    path = qemu_dir / "qemu-aarch64-static"
    data = path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        code_end = emulators._check_elf(fd, len(data), X86_64, "aarch64")
        digest = emulators._digest_fd(fd, "aarch64", search_from=code_end)
        nothing = emulators._digest_fd(fd, "aarch64", search_from=len(data))
    finally:
        os.close(fd)
    assert 0 < code_end < data.find(b"qemu-aarch64 version ") < len(data)
    assert digest.version is not None and digest.version.startswith("qemu-aarch64 version ")
    assert (nothing.checksum, nothing.version) == (digest.checksum, None)
