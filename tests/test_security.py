"""Issue 11: no local user can turn the root daemon against root.

Each test plays the unprivileged local user (a real account made for the test) against a real
daemon in a private binfmt_misc instance, with real QEMU and real foreign binaries.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import daemonutil as du
import pytest
from conftest import LocalUser, daemon_config

SECRET = b"root's secret\n"


@pytest.fixture
def lab() -> Iterator[Path]:
    """A root-owned 0755 directory under /tmp that the test user can traverse (tmp_path is not)."""
    path = Path(tempfile.mkdtemp(prefix="binfmtd-sec-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _setuid_attack(
    daemon: du.Daemon, user: LocalUser, lab: Path, busybox: Callable[[str], Path]
) -> tuple[bytes, str]:
    """As `user`: run a setuid-root arm64 binary asking QEMU to log into a root-only file."""
    suid = lab / "su-arm64"
    shutil.copyfile(busybox("arm64"), suid)
    suid.chmod(0o4755)
    secret = lab / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    done = daemon.ns(
        f"setpriv --reuid {user.uid} --regid {user.gid} --clear-groups "
        f"env -i QEMU_STRACE=1 QEMU_LOG_FILENAME={secret} {suid} true 2>&1"
    )
    return secret.read_bytes(), done.stdout


def test_default_flags_deny_setuid_foreign_binaries_root(
    tmp_path: Path,
    sock: str,
    lab: Path,
    local_user: LocalUser,
    busybox: Callable[[str], Path],
) -> None:
    """Default flags (POF): a user's setuid arm64 binary + QEMU_LOG_FILENAME cannot write root's."""
    cfg = daemon_config(tmp_path, arches=["aarch64"], api={"socket": sock, "group": None})
    with du.running(cfg, sock, mode="compose") as daemon:
        row = daemon.wait_verified(["aarch64"])["aarch64"]
        assert row["flags"] == "POF"
        assert daemon.status().get("warnings") == []
        content, output = _setuid_attack(daemon, local_user, lab, busybox)
        assert not daemon.events("credentials_flag_set")
    assert content == SECRET, f"a local user rewrote a root-only file through QEMU: {output}"


def test_explicit_c_flag_works_and_is_warned_about(
    tmp_path: Path,
    sock: str,
    lab: Path,
    local_user: LocalUser,
    busybox: Callable[[str], Path],
) -> None:
    """flags: POCF is honoured (setuid runs as root: the hole) and warned in log and status."""
    cfg = daemon_config(
        tmp_path, arches=["aarch64"], flags="POCF", api={"socket": sock, "group": None}
    )
    with du.running(cfg, sock, mode="compose") as daemon:
        assert daemon.wait_verified(["aarch64"])["aarch64"]["flags"] == "POCF"
        warnings = daemon.status()["warnings"]
        shown = daemon.ctl("status").stdout
        content, _ = _setuid_attack(daemon, local_user, lab, busybox)
        events = daemon.events("credentials_flag_set")
    assert content != SECRET  # what C costs: the reason it is no longer the default
    assert len(warnings) == 1 and "qemu-aarch64" in warnings[0] and "C flag" in warnings[0]
    assert f"warning: {warnings[0]}" in shown
    (event,) = events
    assert event["entries"] == ["qemu-aarch64"] and event["level"] == "warning"


def _state_from_before(tmp_path: Path) -> None:
    """A state file as binfmtd <= 0.x wrote it: no record of the flags it registered with."""
    state = tmp_path / "state" / "state.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"version": 1, "emulators": {}}), encoding="utf-8")


@pytest.mark.parametrize("evidence", ["entry", "state_file"])
def test_upgrade_from_the_old_c_default_is_logged(
    tmp_path: Path, sock: str, evidence: str, qemu_dir: Path
) -> None:
    """An install that relied on the old FPC default gets one clear log line when upgraded."""
    cfg = daemon_config(tmp_path, arches=["aarch64"], api={"socket": sock, "group": None})
    before = ""
    if evidence == "entry":  # an older binfmtd's entry, still registered
        interpreter = tmp_path / "qemu" / "qemu-aarch64"
        interpreter.parent.mkdir()
        shutil.copyfile(qemu_dir / "qemu-aarch64-static", interpreter)
        interpreter.chmod(0o755)
        before = f"printf '%s' '{_old_entry(str(interpreter))}' > {du.ENTRIES}/register"
    else:
        _state_from_before(tmp_path)
    with du.running(cfg, sock, mode="compose", before=before) as daemon:
        assert daemon.wait_verified(["aarch64"])["aarch64"]["flags"] == "POF"
        (event,) = daemon.events("flags_default_changed")
    assert event["level"] == "warning"
    assert "flags: POCF" in event["hint"]
    assert event["entries"] == (["qemu-aarch64"] if evidence == "entry" else [])


def _old_entry(interpreter: str) -> str:
    from binfmtd import arch as archmod
    from binfmtd.binfmt import Registration

    row = archmod.BY_NAME["aarch64"]
    return Registration(row.entry_name, row.magic, row.mask, interpreter, "POCF").register_string()
