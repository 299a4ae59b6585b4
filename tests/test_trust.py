"""The one trust rule (binfmtd.trust), with a real unprivileged user made for each test."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import LocalUser
from daemonutil import SYSTEM_PYTHON

from binfmtd import trust
from binfmtd.trust import TrustError

SWAPPER = """
import os, sys
d = sys.argv[1]
while True:
    os.rename(d + "/good", d + "/tmp"); os.rename(d + "/evil", d + "/good")
    os.rename(d + "/good", d + "/evil"); os.rename(d + "/tmp", d + "/good")
"""


def _file(path: Path, body: bytes = b"ok\n", mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    path.chmod(mode)
    return path


def test_trusted_file_is_read(tmp_path: Path) -> None:
    """A root-owned file under root-owned, non-writable directories is read in full."""
    assert trust.read_file(str(_file(tmp_path / "a" / "f", b"hello"))) == b"hello"


@pytest.mark.parametrize("where", ["file", "parent", "grandparent"])
def test_user_owned_component_refused(tmp_path: Path, local_user: LocalUser, where: str) -> None:
    """A file, or any directory above it, owned by a user: refused with the chown to run."""
    target = _file(tmp_path / "g" / "p" / "f")
    owned = {"file": target, "parent": target.parent, "grandparent": target.parent.parent}[where]
    os.chown(owned, local_user.uid, local_user.gid)
    with pytest.raises(TrustError, match=f"owner uid {local_user.uid}") as info:
        trust.read_file(str(target))
    assert f"chown root: {owned} && chmod go-w {owned}" in str(info.value)


@pytest.mark.parametrize("where", ["file", "parent"])
def test_group_writable_component_refused(tmp_path: Path, where: str) -> None:
    """A group- or world-writable file or directory on the path is refused."""
    target = _file(tmp_path / "p" / "f")
    (target if where == "file" else target.parent).chmod(0o664 if where == "file" else 0o777)
    with pytest.raises(TrustError, match="writable by a non-root user"):
        trust.read_file(str(target))


def test_sticky_parent_accepted(tmp_path: Path) -> None:
    """A sticky world-writable directory (like /tmp) may hold a trusted root-owned entry."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    assert trust.read_file(str(_file(sticky / "f"))) == b"ok\n"


def test_symlinks_refused_unless_allowed_and_root_owned(
    tmp_path: Path, local_user: LocalUser
) -> None:
    """Links are refused by default; allowed, a root-owned link is walked, a user's is not."""
    real = _file(tmp_path / "real" / "f", b"real")
    link = tmp_path / "link"
    link.symlink_to(real.parent)
    with pytest.raises(TrustError, match="is a symbolic link"):
        trust.read_file(str(link / "f"))
    assert trust.read_file(str(link / "f"), symlinks=True) == b"real"
    os.lchown(link, local_user.uid, local_user.gid)
    with pytest.raises(TrustError, match=f"symbolic link owned by uid {local_user.uid}"):
        trust.read_file(str(link / "f"), symlinks=True)


def test_link_target_is_checked_too(tmp_path: Path, local_user: LocalUser) -> None:
    """A root-owned link to a user's directory does not make that directory trusted."""
    theirs = tmp_path / "theirs"
    _file(theirs / "f")
    os.chown(theirs, local_user.uid, local_user.gid)
    (tmp_path / "link").symlink_to(theirs)
    with pytest.raises(TrustError, match=f"{theirs} is writable by a non-root user"):
        trust.read_file(str(tmp_path / "link" / "f"), symlinks=True)


def test_not_regular_and_missing(tmp_path: Path) -> None:
    """A directory or FIFO where a file is expected is refused; a missing file is ENOENT."""
    os.mkfifo(tmp_path / "fifo", 0o644)
    with pytest.raises(TrustError, match="not a regular file"):
        trust.read_file(str(tmp_path / "fifo"))
    with pytest.raises(TrustError, match="not a regular file"):
        trust.read_file(str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        trust.read_file(str(tmp_path / "absent" / "f"))
    assert info.value.filename == str(tmp_path / "absent")


def test_size_cap(tmp_path: Path) -> None:
    """A file larger than the cap is refused rather than read into memory."""
    with pytest.raises(TrustError, match="larger than 4 bytes"):
        trust.read_file(str(_file(tmp_path / "f", b"12345")), max_bytes=4)


def test_checked_descriptor_is_what_is_read(tmp_path: Path) -> None:
    """Replacing the file after the check changes nothing: the checked fd is the one read."""
    target = _file(tmp_path / "f", b"checked")
    fd = trust.open_file(str(target))
    try:
        _file(tmp_path / "other", b"swapped").rename(target)
        assert trust.read_fd(fd, str(target)) == b"checked"
    finally:
        os.close(fd)


@pytest.fixture
def reachable() -> Iterator[Path]:
    """A root-owned 0755 directory under /tmp that other users can traverse (tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="binfmtd-trust-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_rename_race_in_user_directory_never_wins(reachable: Path, local_user: LocalUser) -> None:
    """A user swapping a root-owned file and their own in their directory: refused every time."""
    theirs = reachable / "theirs"
    _file(theirs / "good", b"root's")
    _file(theirs / "evil", b"user's")
    os.chown(theirs, local_user.uid, local_user.gid)
    os.chown(theirs / "evil", local_user.uid, local_user.gid)
    swapper = local_user.popen([SYSTEM_PYTHON, "-I", "-c", SWAPPER, str(theirs)])
    outcomes = set()
    try:
        for _ in range(500):
            try:
                outcomes.add(trust.read_file(str(theirs / "good")))
            except TrustError:
                outcomes.add(b"refused")
            except FileNotFoundError:
                outcomes.add(b"missing")
    finally:
        swapper.kill()
        swapper.wait()
    assert b"user's" not in outcomes and b"root's" not in outcomes


def test_open_dir_creates_missing_parts(tmp_path: Path) -> None:
    """create_mode makes the missing directories (root-owned) and returns a checked fd."""
    fd = trust.open_dir(str(tmp_path / "a" / "b"), create_mode=0o755)
    try:
        st = os.fstat(fd)
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0
    finally:
        os.close(fd)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755


def test_open_dir_refuses_before_creating_under_untrusted(
    tmp_path: Path, local_user: LocalUser
) -> None:
    """Nothing is made below a user's directory."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, local_user.uid, local_user.gid)
    with pytest.raises(TrustError):
        trust.open_dir(str(theirs / "new"), create_mode=0o755)
    assert os.listdir(theirs) == []


def test_open_file_at(tmp_path: Path, local_user: LocalUser) -> None:
    """A file opened relative to a checked directory fd is checked itself."""
    _file(tmp_path / "d" / "mine", b"mine")
    os.chown(_file(tmp_path / "d" / "theirs"), local_user.uid, local_user.gid)
    with trust.opened_dir(str(tmp_path / "d")) as dir_fd:
        fd = trust.open_file_at(dir_fd, "mine", "d/mine")
        assert trust.read_fd(fd, "d/mine") == b"mine"
        os.close(fd)
        with pytest.raises(TrustError, match="owner uid"):
            trust.open_file_at(dir_fd, "theirs", "d/theirs")
        with pytest.raises(TrustError, match="single file name"):
            trust.open_file_at(dir_fd, "../d/mine", "x")


def test_private_dir(tmp_path: Path, local_user: LocalUser) -> None:
    """private_dir makes a 0700 root directory; a user's, a link or an open one is refused."""
    made = trust.private_dir(str(tmp_path), "p")
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700
    assert trust.private_dir(str(tmp_path), "p") == made
    os.chmod(made, 0o755)
    with pytest.raises(TrustError, match="chmod 700"):
        trust.private_dir(str(tmp_path), "p")
    os.chmod(made, 0o700)
    os.chown(made, local_user.uid, local_user.gid)
    with pytest.raises(TrustError, match=f"owner uid {local_user.uid}"):
        trust.private_dir(str(tmp_path), "p")
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "q").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(TrustError, match="not a directory"):
        trust.private_dir(str(tmp_path), "q")


def test_relative_and_dotdot(tmp_path: Path) -> None:
    """Relative paths are refused; '..' walks back up through checked directories."""
    with pytest.raises(TrustError, match="absolute"):
        trust.read_file("etc/passwd")
    target = _file(tmp_path / "a" / "f", b"x")
    assert trust.read_file(f"{tmp_path}/a/../a/./f") == b"x"
    assert target.exists()
