"""Where a foreign qemu entry comes from, and handing it to binfmtd (issue 12, one owner).

The file-level tests read Debian's real binfmt.d fragments (from the cached qemu-user-static
.deb) in a temporary tree. The boot tests run the real systemd-binfmt against a private
binfmt_misc with those fragments bind-mounted where it reads them, then binfmtd: before a
take-over the entries stay Debian's and the report says where they come from and the command
to hand them over; after it a "reboot" leaves them to binfmtd.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import Cache, write_config
from daemonutil import SandboxSh

from binfmtd import origin, takeover

SYSTEMD_BINFMT = "/lib/systemd/systemd-binfmt"
ADMIN_AARCH64 = (
    "qemu-user-static\nmagic\n0\n"
    r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
    "\n"
    r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
    "\n/usr/libexec/qemu-binfmt/aarch64-binfmt-P\n\nno\nyes\nyes\n"
)


def tree(tmp: Path, cache: Cache) -> origin.Roots:
    """etc/run/usr-lib binfmt.d dirs under `tmp`, usr-lib holding Debian's real fragments."""
    dirs = [tmp / d for d in ("etc", "run", "usrlib")]
    for d in dirs:
        d.mkdir()
    for conf in cache.binfmt_d.glob("qemu-*.conf"):
        shutil.copy(conf, dirs[2] / conf.name)
    (tmp / "binfmts").mkdir()
    return origin.Roots(binfmt_d=tuple(map(str, dirs)), binfmts_admin=str(tmp / "binfmts"))


def test_debian_fragment_named_with_mask_command(tmp_path: Path, cache: Cache) -> None:
    """A Debian /usr/lib fragment is reported with the /etc mask that hands the arch over."""
    roots = tree(tmp_path, cache)
    (found,) = origin.find("qemu-aarch64", roots)
    assert found.tool is origin.Tool.SYSTEMD_BINFMT and found.active
    assert found.path == f"{roots.binfmt_d[2]}/qemu-aarch64.conf"
    assert found.command() == f"ln -s /dev/null {roots.binfmt_d[0]}/qemu-aarch64.conf"
    assert "registered at boot by systemd-binfmt" in origin.scan(roots).describe("qemu-aarch64")


def test_mask_and_overrides_follow_binfmt_d_precedence(tmp_path: Path, cache: Cache) -> None:
    """/etc masks /usr/lib; a /run file replaces it; an admin's own /etc file is moved aside."""
    roots = tree(tmp_path, cache)
    etc, run, usrlib = (Path(d) for d in roots.binfmt_d)
    (etc / "qemu-arm.conf").symlink_to("/dev/null")
    (run / "qemu-s390x.conf").write_text(":qemu-s390x:M::\\x7f:\\xff:/x:F\n:other:E::x::/y:\n")
    (etc / "local.conf").write_text("# mine\n:qemu-riscv64:M::\\x7f:\\xff:/opt/q:F\n")
    (arm,) = origin.find("qemu-arm", roots)
    assert not arm.active and "does not come back after a reboot" in arm.describe()
    (s390x,) = origin.find("qemu-s390x", roots)
    assert s390x.path == str(run / "qemu-s390x.conf") and s390x.shares == ("other",)
    assert "also defines other" in s390x.describe()
    mine, debian = origin.find("qemu-riscv64", roots)  # both files define it: both reported
    assert debian.path == str(usrlib / "qemu-riscv64.conf")
    assert mine.command() == f"mv {etc}/local.conf {etc}/local.conf.disabled"


def test_binfmt_support_format_and_runtime_entry(tmp_path: Path, cache: Cache) -> None:
    """binfmt-support's admin file names its package and the persistent removal command."""
    roots = tree(tmp_path, cache)
    Path(roots.binfmts_admin, "qemu-aarch64").write_text(ADMIN_AARCH64)
    tools = {o.tool: o for o in origin.find("qemu-aarch64", roots)}
    support = tools[origin.Tool.BINFMT_SUPPORT]
    assert support.package == "qemu-user-static"
    assert support.command() == (
        "update-binfmts --package qemu-user-static --remove qemu-aarch64 "
        "/usr/libexec/qemu-binfmt/aarch64-binfmt-P"
    )
    assert "will not come back after a reboot" in origin.scan(roots).describe("qemu-made-up")


def test_take_over_then_undo_restores_exactly(tmp_path: Path, cache: Cache) -> None:
    """take_over masks only the named entries' fragments; undo removes exactly those masks."""
    roots = tree(tmp_path, cache)
    etc = Path(roots.binfmt_d[0])
    (etc / "keep.conf").write_text(":keep:E::k::/bin/true:\n")
    manifest = str(tmp_path / "state" / "takeover.jsonl")
    names = ["qemu-aarch64", "qemu-s390x"]
    steps = takeover.take_over(names, roots, str(tmp_path / "none"), manifest, dry_run=False)
    assert steps == [f"ln -s /dev/null {etc}/{n}.conf" for n in names]
    assert all(not o.active for n in names for o in origin.find(n, roots))
    assert origin.find("qemu-arm", roots)[0].active
    assert takeover.take_over(names, roots, "/none", manifest, dry_run=False) == []
    assert len(takeover.undo(manifest)) == 2
    assert sorted(os.listdir(etc)) == ["keep.conf"] and not os.path.exists(manifest)


# ---------------------------------------------------------------- boot, on the real kernel

BOOT = """
# The boot-time view: Debian's fragments where systemd-binfmt reads them, their interpreters
# where the fragments point (Debian's -P names, here the cached static binaries).
mount --bind "$WORK/usrlib" /usr/lib/binfmt.d
mount --bind "$WORK/etc" /etc/binfmt.d
mount -t tmpfs tmpfs /usr/libexec
mkdir /usr/libexec/qemu-binfmt
for q in "$QEMU_DIR"/qemu-*-static; do
  a=${q##*/qemu-}; ln -s "$q" "/usr/libexec/qemu-binfmt/${a%-static}-binfmt-P"
done
/lib/systemd/systemd-binfmt
"$BINFMTD" --oneshot --json --config "$WORK/binfmtd.yaml" || true
"""


def boot(sandbox_sh: SandboxSh, work: Path) -> dict[str, dict[str, str]]:
    """systemd-binfmt then binfmtd --oneshot in one private instance; arch -> status row."""
    out = sandbox_sh(BOOT, env={"WORK": str(work)})
    assert out.returncode == 0, out.stderr
    return {row["arch"]: row for row in json.loads(out.stdout)["arches"]}


@pytest.fixture
def boot_work(tmp_path: Path, cache: Cache) -> Path:
    """A work dir: Debian's fragments in usrlib/, an empty etc/, a two-arch binfmtd config."""
    if not os.access(SYSTEMD_BINFMT, os.X_OK):
        pytest.fail(f"{SYSTEMD_BINFMT} is missing: run ./scripts/setup", pytrace=False)
    tree(tmp_path, cache)
    write_config(tmp_path, arches=["aarch64", "s390x"])
    return tmp_path


def test_boot_without_take_over_reports_foreign_with_origin(
    sandbox_sh: SandboxSh, boot_work: Path
) -> None:
    """After systemd-binfmt, Debian's entries stay, reported with fragment and mask command."""
    rows = boot(sandbox_sh, boot_work)
    for arch in ("aarch64", "s390x"):
        assert rows[arch]["state"].startswith("foreign"), rows[arch]
        assert rows[arch]["interpreter"] == f"/usr/libexec/qemu-binfmt/{arch}-binfmt-P"
        error = rows[arch]["error"]
        assert f"binfmt.d fragment /usr/lib/binfmt.d/qemu-{arch}.conf" in error
        assert f"ln -s /dev/null /etc/binfmt.d/qemu-{arch}.conf" in error


def test_boot_after_take_over_converges_to_binfmtd(sandbox_sh: SandboxSh, boot_work: Path) -> None:
    """Taken over (masks in /etc/binfmt.d), a boot leaves the arches to binfmtd: verified."""
    roots = origin.Roots(
        binfmt_d=(str(boot_work / "etc"), str(boot_work / "usrlib")), binfmts_admin="/none"
    )
    manifest = str(boot_work / "takeover.jsonl")
    names = ["qemu-aarch64", "qemu-s390x"]
    takeover.take_over(names, roots, "/none", manifest, dry_run=False)
    rows = boot(sandbox_sh, boot_work)
    for arch in ("aarch64", "s390x"):
        assert rows[arch]["state"] == "verified", rows[arch]
        assert rows[arch]["interpreter"].startswith(str(boot_work / "qemu")), rows[arch]
