"""Emulator sources: every mainstream layout with real packages, auto, trust, provenance."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Trixie

from binfmtd import config, deb, emulators
from binfmtd.config import SourceConfig, SourceKind
from binfmtd.emulators import InstallError
from binfmtd.sources import Found, Missing, Source

X86_64 = 62


def sha256(path: Path) -> str:
    """The hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def collect(source: Source, arches: list[str]) -> dict[str, Any]:
    """{arch: (sha256 of the streamed bytes, origin, package, version) or the Missing reason}."""
    got: dict[str, Any] = {}
    for item in source.streams(arches):
        if isinstance(item, Missing):
            got[item.arch] = item.reason
        else:
            digest = hashlib.sha256(item.stream.read()).hexdigest()
            got[item.arch] = (digest, item.origin, item.package, item.version)
    return got


def directory(path: Path) -> Source:
    """A directory source."""
    return Source(SourceConfig(SourceKind.DIRECTORY, str(path)))


def layout(tmp: Path, entries: dict[str, Path | str]) -> Path:
    """A root-owned directory: a Path value is copied in, a str value becomes a symlink."""
    tmp.mkdir(parents=True, exist_ok=True)
    for name, what in entries.items():
        if isinstance(what, Path):
            shutil.copyfile(what, tmp / name)
            (tmp / name).chmod(0o755)
        else:
            (tmp / name).symlink_to(what)
    return tmp


# ---------------------------------------------------------------- the layouts, real packages


def test_debian13_installed_layout(trixie: Trixie) -> None:
    """Debian 13 with qemu-user and transitional qemu-user-static: -static links lead to qemu-A."""
    got = collect(directory(trixie.usr_bin), ["aarch64", "s390x"])
    for arch in ("aarch64", "s390x"):
        real = trixie.usr_bin / f"qemu-{arch}"
        assert got[arch] == (sha256(real), str(real), None, None)


def test_debian13_qemu_user_alone(trixie: Trixie, tmp_path: Path) -> None:
    """Debian 13 with only qemu-user (no -static names at all): the qemu-A files are used."""
    src = layout(tmp_path / "bin", {"qemu-riscv64": trixie.usr_bin / "qemu-riscv64"})
    got = collect(directory(src), ["riscv64", "s390x"])
    assert got["riscv64"][:2] == (sha256(src / "qemu-riscv64"), str(src / "qemu-riscv64"))
    assert "has no qemu-s390x-static or qemu-s390x" in got["s390x"]
    assert "Debian 13: qemu-user" in got["s390x"]


def test_debian12_ubuntu_layout(qemu_dir: Path) -> None:
    """Debian 12 / Ubuntu qemu-user-static: regular qemu-A-static files."""
    got = collect(directory(qemu_dir), ["aarch64"])
    real = qemu_dir / "qemu-aarch64-static"
    assert got["aarch64"] == (sha256(real), str(real), None, None)


def test_fedora_layout_prefers_static_over_a_dynamic_qemu_user(
    qemu_dir: Path, tmp_path: Path
) -> None:
    """Fedora: qemu-user-static-<arch> gives /usr/bin/qemu-A-static next to qemu-user's dynamic
    qemu-A (arranged from Debian's real binaries and a dynamic executable): -static wins."""
    dynamic = Path(shutil.which("ls") or "/bin/ls")
    src = layout(
        tmp_path / "usr" / "bin",
        {"qemu-aarch64-static": qemu_dir / "qemu-aarch64-static", "qemu-aarch64": dynamic},
    )
    got = collect(directory(src), ["aarch64"])
    assert got["aarch64"][1] == str(src / "qemu-aarch64-static")
    assert got["aarch64"][0] == sha256(qemu_dir / "qemu-aarch64-static")


def test_same_directory_symlinks_are_followed(qemu_dir: Path, tmp_path: Path) -> None:
    """qemu-A-static -> qemu-A (and a two-link chain) in one trusted directory is accepted."""
    src = layout(
        tmp_path / "bin",
        {
            "qemu-s390x": qemu_dir / "qemu-s390x-static",
            "qemu-s390x-static": "qemu-s390x",
            "qemu-arm-static": "qemu-arm-real",
            "qemu-arm-real": "qemu-arm",
            "qemu-arm": qemu_dir / "qemu-arm-static",
        },
    )
    got = collect(directory(src), ["s390x", "arm"])
    assert got["s390x"][:2] == (sha256(qemu_dir / "qemu-s390x-static"), str(src / "qemu-s390x"))
    assert got["arm"][:2] == (sha256(qemu_dir / "qemu-arm-static"), str(src / "qemu-arm"))
    origins = directory(src).origins(["s390x", "arm", "riscv64"])
    assert origins == {"s390x": str(src / "qemu-s390x"), "arm": str(src / "qemu-arm")}


def test_origins_match_what_streams_read(qemu_dir: Path) -> None:
    """origins (stat only, for the early package lookup) names the files streams opens."""
    source = directory(qemu_dir)
    arches = ["aarch64", "s390x", "riscv64"]
    got = collect(source, arches)
    assert source.origins(arches) == {a: got[a][1] for a in arches}


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("/usr/bin/true", "outside"),
        ("../elsewhere/qemu-aarch64", "outside"),
        ("qemu-nonesuch", "which does not exist"),
    ],
    ids=["absolute", "parent-dir", "dangling"],
)
def test_links_leaving_the_directory_are_refused(tmp_path: Path, target: str, why: str) -> None:
    """A symlink out of the source directory (or to nothing) is a clear error naming it."""
    src = layout(tmp_path / "bin", {"qemu-aarch64-static": target})
    with pytest.raises(InstallError, match=why) as info:
        collect(directory(src), ["aarch64"])
    assert "qemu-aarch64-static" in str(info.value)


def test_debian13_qemu_user_deb(trixie: Trixie) -> None:
    """Debian 13's qemu-user .deb: usr/bin/qemu-A members, package and version from control."""
    source = Source(SourceConfig(SourceKind.DEB, str(trixie.qemu_user_deb)))
    got = collect(source, ["aarch64", "s390x"])
    version = trixie.qemu_user_deb.name.split("_")[1].replace("%3a", ":")
    for arch in ("aarch64", "s390x"):
        digest = sha256(trixie.usr_bin / f"qemu-{arch}")
        origin = f"{trixie.qemu_user_deb}:usr/bin/qemu-{arch}"
        assert got[arch] == (digest, origin, "qemu-user", version)


def test_debian13_transitional_deb_says_what_to_use(trixie: Trixie) -> None:
    """Debian 13's qemu-user-static .deb holds only links: the error names qemu-user."""
    source = Source(SourceConfig(SourceKind.DEB, str(trixie.qemu_user_static_deb)))
    got = collect(source, ["aarch64"])
    assert "usr/bin/qemu-aarch64-static -> qemu-aarch64" in got["aarch64"]
    assert "transitional" in got["aarch64"]
    assert "use the qemu-user .deb" in got["aarch64"]


def test_debian12_deb(qemu_deb: Path, qemu_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian 12's qemu-user-static .deb: -static members, byte for byte, with its version; read
    in Python alone (no dpkg, no tar: no process is started)."""

    def no_subprocess(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a subprocess was started: {args!r}")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    got = collect(Source(SourceConfig(SourceKind.DEB, str(qemu_deb))), ["s390x", "nonesuch"])
    digest, origin, package, version = got["s390x"]
    assert digest == sha256(qemu_dir / "qemu-s390x-static")
    assert (origin, package) == (f"{qemu_deb}:usr/bin/qemu-s390x-static", "qemu-user-static")
    assert version.startswith("1:7.2")
    assert "has no usr/bin/qemu-nonesuch-static" in got["nonesuch"]


def test_ubuntu_style_zstd_deb(qemu_deb: Path, qemu_dir: Path, tmp_path: Path) -> None:
    """A .deb with data.tar.zst, as Ubuntu builds them (Ubuntu's own are not reachable here:
    Debian 12's real package rebuilt with `dpkg-deb -Zzstd`), is read like any other."""
    tree = tmp_path / "tree"
    subprocess.run(["dpkg-deb", "-R", str(qemu_deb), str(tree)], check=True)
    ubuntu = tmp_path / "qemu-user-static_ubuntu.deb"
    build = ["dpkg-deb", "-Zzstd", "-z1", "--root-owner-group", "-b", str(tree), str(ubuntu)]
    subprocess.run(build, check=True, capture_output=True)
    shutil.rmtree(tree)
    fd = os.open(ubuntu, os.O_RDONLY)
    try:
        assert "data.tar.zst" in [m.name for m in deb.ar_members(fd, str(ubuntu))]
    finally:
        os.close(fd)
    got = collect(Source(SourceConfig(SourceKind.DEB, str(ubuntu))), ["s390x"])
    assert got["s390x"][0] == sha256(qemu_dir / "qemu-s390x-static")
    assert got["s390x"][2] == "qemu-user-static"


# ---------------------------------------------------------------- auto


def auto(dirs: list[Path]) -> Source:
    """An auto source searching `dirs`."""
    return Source(SourceConfig(), auto_dirs=tuple(str(d) for d in dirs))


def test_auto_finds_debian13_layout(trixie: Trixie, tmp_path: Path) -> None:
    """auto skips a directory without QEMU and finds the Debian 13 layout."""
    empty = tmp_path / "empty"
    empty.mkdir()
    source = auto([empty, trixie.usr_bin])
    assert source.path == str(trixie.usr_bin)
    assert source.describe() == f"auto:{trixie.usr_bin}"
    assert collect(source, ["aarch64"])["aarch64"][1] == str(trixie.usr_bin / "qemu-aarch64")


def test_auto_finds_qemu_user_without_static_names(trixie: Trixie, tmp_path: Path) -> None:
    """Debian 13 with only qemu-user (no -static names): auto still finds /usr/bin."""
    src = layout(tmp_path / "bin", {"qemu-aarch64": trixie.usr_bin / "qemu-aarch64"})
    assert auto([tmp_path / "none", src]).path == str(src)


def test_auto_prefers_a_directory_with_static_names(qemu_dir: Path, tmp_path: Path) -> None:
    """A directory with only a (possibly dynamic) qemu-A loses to one with qemu-A-static."""
    plain = layout(tmp_path / "plain", {"qemu-aarch64": Path(shutil.which("ls") or "/bin/ls")})
    assert auto([plain, qemu_dir]).path == str(qemu_dir)


def test_auto_without_any_qemu_names_every_package(tmp_path: Path) -> None:
    """No QEMU anywhere: the error names the package of each distribution and the alternative."""
    source = auto([tmp_path])
    with pytest.raises(InstallError, match="Debian 13: qemu-user; Debian 12 and Ubuntu") as info:
        source.check_available()
    assert "source.kind: deb" in str(info.value)
    assert source.describe() == "auto:?"


def test_auto_follows_a_package_appearing_later(qemu_dir: Path, tmp_path: Path) -> None:
    """auto is resolved on use: installing the package after start is picked up."""
    later = tmp_path / "bin"
    later.mkdir()
    source = auto([later])
    with pytest.raises(InstallError):
        source.check_available()
    shutil.copyfile(qemu_dir / "qemu-s390x-static", later / "qemu-s390x-static")
    source.check_available()
    assert source.path == str(later)


# ---------------------------------------------------------------- trust (issue 11, item 2a)


def untrusted(path: Path, how: str) -> None:
    """Make `path` changeable by a non-root user: owned by uid 1000, or group/other-writable."""
    if how == "owner":
        os.chown(path, 1000, 1000, follow_symlinks=False)
    else:
        path.chmod(path.stat().st_mode | (0o020 if how == "group" else 0o002))


@pytest.mark.parametrize("how", ["owner", "group", "other"])
@pytest.mark.parametrize("what", ["directory", "file", "parent"])
def test_untrusted_directory_source_is_refused(
    qemu_dir: Path, tmp_path: Path, what: str, how: str
) -> None:
    """A source dir, its parent or a file in it that a non-root user controls: refused with the
    chown/chmod to run, before a byte of the file is read."""
    src = layout(tmp_path / "parent" / "bin", {"qemu-s390x-static": qemu_dir / "qemu-s390x-static"})
    target = {"directory": src, "file": src / "qemu-s390x-static", "parent": src.parent}[what]
    untrusted(target, how)
    source = directory(src)
    with pytest.raises(InstallError, match="writable by a non-root user") as info:
        if what != "file":
            source.check_available()
        collect(source, ["s390x"])
    assert f"chown root: {target} && chmod go-w {target}" in str(info.value)


@pytest.mark.parametrize("how", ["owner", "group", "other"])
@pytest.mark.parametrize("what", ["deb", "parent"])
def test_untrusted_deb_is_refused(qemu_deb: Path, tmp_path: Path, what: str, how: str) -> None:
    """A .deb (or its directory) a non-root user controls is refused with the fix."""
    parent = tmp_path / "debs"
    parent.mkdir()
    copy = parent / "qemu.deb"
    shutil.copyfile(qemu_deb, copy)
    target = copy if what == "deb" else parent
    untrusted(target, how)
    source = Source(SourceConfig(SourceKind.DEB, str(copy)))
    with pytest.raises(InstallError, match="writable by a non-root user") as info:
        source.check_available()
    assert f"chown root: {target}" in str(info.value)
    with pytest.raises(InstallError, match="writable by a non-root user"):
        collect(source, ["aarch64"])


def test_symlinked_deb_is_refused(qemu_deb: Path, tmp_path: Path) -> None:
    """source.path naming a symlink to a .deb is refused (it could be re-pointed)."""
    link = tmp_path / "qemu.deb"
    link.symlink_to(qemu_deb)
    with pytest.raises(InstallError, match="symbolic link"):
        Source(SourceConfig(SourceKind.DEB, str(link))).check_available()


def test_link_owned_by_a_user_in_a_trusted_directory_is_still_only_followed_inside(
    qemu_dir: Path, tmp_path: Path
) -> None:
    """The file a same-directory link names is itself checked: a user's file is refused."""
    src = layout(
        tmp_path / "bin",
        {"qemu-arm": qemu_dir / "qemu-arm-static", "qemu-arm-static": "qemu-arm"},
    )
    untrusted(src / "qemu-arm", "owner")
    with pytest.raises(InstallError, match=f"{src}/qemu-arm is writable by a non-root user"):
        collect(directory(src), ["arm"])


# ---------------------------------------------------------------- what a source offers


def test_debian13_offers_every_catalog_arch_but_cris_and_nios2(trixie: Trixie) -> None:
    """QEMU 10 dropped cris and nios2: the installed layout and the .deb (its md5sums) say so."""
    from binfmtd.arch import CATALOG

    expected = frozenset(r.name for r in CATALOG) - {"cris", "nios2"}
    assert directory(trixie.usr_bin).offers() == expected
    assert Source(SourceConfig(SourceKind.DEB, str(trixie.qemu_user_deb))).offers() == expected


def test_sources_that_cannot_tell_offer_none(trixie: Trixie, tmp_path: Path) -> None:
    """A transitional .deb (no files but docs), a missing or untrusted source: None, so every
    arch is tried and reports its own error."""
    assert Source(SourceConfig(SourceKind.DEB, str(trixie.qemu_user_static_deb))).offers() is None
    assert directory(tmp_path / "missing").offers() is None
    src = layout(tmp_path / "bin", {"qemu-aarch64": trixie.usr_bin / "qemu-aarch64"})
    assert directory(src).offers() == frozenset({"aarch64"})
    untrusted(src, "group")
    assert Source(SourceConfig(SourceKind.DEB, str(src / "x.deb"))).offers() is None


# ---------------------------------------------------------------- fingerprints, provenance


def test_identity_changes_when_the_link_target_changes(qemu_dir: Path, tmp_path: Path) -> None:
    """A package upgrade replacing qemu-A behind an unchanged qemu-A-static link is noticed."""
    src = layout(
        tmp_path / "bin",
        {"qemu-arm": qemu_dir / "qemu-arm-static", "qemu-arm-static": "qemu-arm"},
    )
    source = directory(src)
    before = source.identity("arm")
    (src / "qemu-arm").unlink()
    shutil.copyfile(qemu_dir / "qemu-armeb-static", src / "qemu-arm")
    assert source.identity("arm") != before
    assert source.fingerprint("nonesuch").startswith("unavailable:")


def test_packages_of_asks_dpkg(trixie: Trixie, sandbox_sh: Callable[..., Any]) -> None:
    """dpkg-query -S names the package (and version) a file of the installed layout came from.

    Runs in a mount namespace whose /var/lib/dpkg is the private root's real dpkg database and
    whose /usr/bin holds Debian 13's files (an overlay), as on a Debian 13 host.
    """
    script = f"""
        mount -t overlay overlay -o lowerdir={trixie.usr_bin}:/usr/bin /usr/bin
        mount --bind {trixie.dpkg_admin} /var/lib/dpkg
        "$PYTHON" -c 'import json; from binfmtd.sources import packages_of; print(json.dumps(
            packages_of(["/usr/bin/qemu-aarch64", "/usr/bin/qemu-s390x-static", "/nonesuch"])))'
    """
    run = sandbox_sh(script)
    assert run.returncode == 0, run.stderr
    version = trixie.qemu_user_deb.name.split("_")[1].replace("%3a", ":")
    assert json.loads(run.stdout) == {
        "/usr/bin/qemu-aarch64": ["qemu-user", version],
        "/usr/bin/qemu-s390x-static": ["qemu-user-static", version],
    }


FEDORA_SPEC = """Name: qemu-user-static-aarch64
Version: 7.2.22
Release: 1.fc41
Epoch: 2
Summary: QEMU user mode emulation for aarch64 (static), arranged from Debian's binary
License: GPL-2.0-or-later
%description
The Fedora layout of one emulator, for the test.
%install
mkdir -p %{buildroot}/usr/bin
cp %{src} %{buildroot}/usr/bin/qemu-aarch64-static
%files
/usr/bin/qemu-aarch64-static
"""


def test_packages_of_asks_rpm_on_a_fedora_layout(
    qemu_dir: Path, tmp_path: Path, sandbox_sh: Callable[..., Any]
) -> None:
    """Fedora's layout with a real RPM database: rpm -qf names the package and epoch:version.

    Fedora's RPMs are not reachable here: the package is built with rpmbuild from Debian's
    binary under Fedora's name, recorded in an RPM database (rpm --justdb), and the sandbox
    shows that database at /var/lib/rpm (no dpkg there, as on Fedora) and the file in /usr/bin.
    """
    if not shutil.which("rpmbuild"):
        pytest.skip("rpmbuild is missing: run ./scripts/setup")
    top, db, root = tmp_path / "rpmbuild", tmp_path / "rpmdb", tmp_path / "root" / "bin"
    (top / "SPECS").mkdir(parents=True)
    spec = top / "SPECS" / "qemu.spec"
    spec.write_text(FEDORA_SPEC, encoding="utf-8")
    defines = [f"_topdir {top}", f"src {qemu_dir / 'qemu-aarch64-static'}"]
    defines += ["_binary_payload w1.gzdio", "__os_install_post %{nil}", "debug_package %{nil}"]
    argv = ["rpmbuild", "-bb", "--quiet", str(spec)]
    for define in defines:
        argv[1:1] = ["--define", define]
    subprocess.run(argv, check=True, capture_output=True)
    (rpm,) = (top / "RPMS").rglob("*.rpm")
    db.mkdir()
    install = ["rpm", "--dbpath", str(db), "-i", "--justdb", "--nodeps", "--ignorearch"]
    subprocess.run([*install, str(rpm)], check=True, capture_output=True)
    layout(root, {"qemu-aarch64-static": qemu_dir / "qemu-aarch64-static"})
    script = f"""
        mount -t overlay overlay -o lowerdir={root}:/usr/bin /usr/bin
        mount -t tmpfs tmpfs /var/lib && mkdir /var/lib/rpm && mount --bind {db} /var/lib/rpm
        "$PYTHON" -c 'import json; from binfmtd.sources import packages_of; print(json.dumps(
            packages_of(["/usr/bin/qemu-aarch64-static", "/usr/bin/nonesuch"])))'
    """
    run = sandbox_sh(script)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {
        "/usr/bin/qemu-aarch64-static": ["qemu-user-static-aarch64", "2:7.2.22-1.fc41"]
    }


def test_install_from_found_stream(trixie: Trixie, tmp_path: Path) -> None:
    """A Found stream installs like any other: the Debian 13 file lands checked at qemu-A."""
    dest = tmp_path / "qemu"
    emulators.ensure_install_dir(str(dest))
    for item in directory(trixie.usr_bin).streams(["aarch64"]):
        assert isinstance(item, Found)
        written = emulators.install_stream(item.stream, "aarch64", str(dest), X86_64)
        path, digest = written.path, written.checksum
    inode = os.stat(path).st_ino
    assert digest == emulators.checksum_of(path, linked_inode=inode)
    assert digest.startswith("blake3:")
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == sha256(
        trixie.usr_bin / "qemu-aarch64"
    )
    assert (emulators.qemu_version(path) or "").startswith("qemu-aarch64 version 10.0")


def test_directory_source_streams_only_what_exists(qemu_dir: Path) -> None:
    """A directory source yields the arches it has and a Missing for the rest."""
    got = collect(directory(qemu_dir), ["s390x", "nonesuch", "riscv64"])
    assert isinstance(got["nonesuch"], str)
    assert {"s390x", "riscv64"} <= {a for a, v in got.items() if isinstance(v, tuple)}


def test_missing_source_gives_a_clear_error(tmp_path: Path) -> None:
    """A source path that does not exist, or lacks the arch, says so."""
    missing = directory(tmp_path / "nope")
    with pytest.raises(InstallError, match=r"emulator source .*/nope does not exist"):
        missing.check_available()
    with pytest.raises(InstallError, match="has no qemu-aarch64-static"):
        directory(tmp_path).identity("aarch64")


def test_non_regular_file_is_refused(tmp_path: Path) -> None:
    """A directory named like an emulator is refused, not read."""
    src = tmp_path / "bin"
    (src / "qemu-s390x-static").mkdir(parents=True)
    with pytest.raises(InstallError, match="not a regular file"):
        collect(directory(src), ["s390x"])


def test_find_auto_dir_module_default_is_the_system_bin() -> None:
    """The default search path is /usr/bin then /usr/local/bin."""
    assert config.AUTO_DIRS == ("/usr/bin", "/usr/local/bin")
