"""Where emulator bytes come from: an installed layout (a directory) or a .deb.

Layouts found in the field, all handled by one directory rule ("for arch A, take
`qemu-A-static`, else `qemu-A`; a symbolic link is followed only to a file in the same
directory"):
- Debian 12, Ubuntu, Fedora (`qemu-user-static`, `qemu-user-static-<arch>`): regular files
  `/usr/bin/qemu-A-static`.
- Debian 13 `qemu-user`: static regular files `/usr/bin/qemu-A`; its transitional
  `qemu-user-static` adds symlinks `qemu-A-static -> qemu-A`.
A .deb is read without dpkg (`binfmtd.deb`): regular members `usr/bin/qemu-A-static` or
`usr/bin/qemu-A`; a member that is only a symlink to a file the package lacks (Debian 13's
transitional package) is reported as such. `auto` searches AUTO_DIRS for either name.

Trust is `binfmtd.trust`'s one rule: the source directory or .deb, the whole path above it and
every file taken from it must be root-owned and not writable by group or others; each file is
opened relative to the checked directory descriptor (O_NOFOLLOW) and checked on its own
descriptor, and its bytes are read from that descriptor. Nothing from a refused source is read
further, let alone executed. Errors are `InstallError`s naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO

from binfmtd import deb, trust
from binfmtd.config import AUTO_DIRS, SourceConfig, SourceKind
from binfmtd.emulators import InstallError
from binfmtd.run import run

RPM_DB = "/var/lib/rpm"  # Fedora, RHEL, SUSE (a symlink to /usr/lib/sysimage/rpm on Fedora)
MAX_LINK_HOPS = 8
_PACKAGES = (
    "Debian 13: qemu-user; Debian 12 and Ubuntu: qemu-user-static; Fedora: qemu-user-static-<arch>"
)


@dataclass(frozen=True)
class Found:
    """One emulator the source has: its bytes, and where they come from."""

    arch: str
    stream: IO[bytes]
    origin: str  # the file (or `<deb>:<member>`) whose bytes these are
    package: str | None = None  # known for a .deb from its control file
    version: str | None = None


@dataclass(frozen=True)
class Missing:
    """An arch the source cannot provide, and why (phrased for the operator)."""

    arch: str
    reason: str


def names_for(arch: str) -> tuple[str, str]:
    """The file names that may hold `arch`'s emulator, preferred first."""
    return f"qemu-{arch}-static", f"qemu-{arch}"


class Source:
    """A configured emulator source; `auto` is resolved again on every use (cheap stats)."""

    def __init__(self, cfg: SourceConfig, auto_dirs: tuple[str, ...] = AUTO_DIRS) -> None:
        self.cfg = cfg
        self.auto_dirs = auto_dirs
        self._auto: tuple[tuple[int, ...], str | None] | None = None  # (dir mtimes, found)
        self._offered: tuple[str, frozenset[str]] | None = None  # (fingerprint, arches)

    @property
    def kind(self) -> SourceKind:
        """DIRECTORY or DEB: what the source is once `auto` is resolved."""
        return SourceKind.DEB if self.cfg.kind is SourceKind.DEB else SourceKind.DIRECTORY

    @property
    def path(self) -> str:
        """The directory or .deb (for `auto`, the first of AUTO_DIRS holding a QEMU)."""
        if self.cfg.kind is not SourceKind.AUTO:
            assert self.cfg.path is not None  # the config requires it
            return self.cfg.path
        found = self._auto_dir()
        if found is None:
            dirs = " or ".join(self.auto_dirs)
            raise InstallError(
                f"no static QEMU found in {dirs}: install one ({_PACKAGES}), or set "
                "source.kind: deb with source.path: <file.deb>"
            )
        return found

    def _auto_dir(self) -> str | None:
        """find_auto_dir, searched again only when one of the directories changed."""
        key = tuple(_mtime_ns(d) for d in self.auto_dirs)
        if self._auto is None or self._auto[0] != key:
            self._auto = (key, find_auto_dir(self.auto_dirs))
        return self._auto[1]

    def describe(self) -> str:
        """A short label for logs and the state file, e.g. `auto:/usr/bin`, `deb:/x.deb`."""
        try:
            return f"{self.cfg.kind.value}:{self.path}"
        except InstallError:
            return f"{self.cfg.kind.value}:?"

    def check_available(self) -> None:
        """Raise InstallError unless the source exists and passes the trust rule."""
        path = self.path
        if not os.path.lexists(path):
            raise InstallError(f"emulator source {path} does not exist")
        if self.kind is SourceKind.DEB:
            os.close(open_trusted_file(path))
        else:
            os.close(open_trusted_dir(path))

    def identity(self, arch: str) -> str:
        """A cheap fingerprint of what `arch` would be installed from (stat; no hashing).

        For a .deb the package file; for a directory the file, and the link naming it.
        Raises InstallError or OSError when there is nothing to fingerprint.
        """
        path = self.path
        if self.kind is SourceKind.DEB:
            return _stat_id(os.stat(path))
        parts = []
        for name in names_for(arch):
            with contextlib.suppress(FileNotFoundError):
                parts.append(_stat_id(os.stat(os.path.join(path, name), follow_symlinks=False)))
                if os.path.islink(os.path.join(path, name)):
                    parts.append(_stat_id(os.stat(os.path.join(path, name))))
                break
        if not parts:
            raise InstallError(f"source {path} has no {' or '.join(names_for(arch))}")
        return "/".join(parts)

    def offers(self) -> frozenset[str] | None:
        """The catalog arches the source has a file for; None when it cannot tell (missing,
        refused or corrupt source, or a .deb listing no emulator): then every arch is tried
        and each reports why it failed. Scanned again only when the source changes."""
        try:
            path = self.path
            key = f"{path}:{_stat_id(os.stat(path))}"
        except (InstallError, OSError):
            return None
        if self._offered is None or self._offered[0] != key:
            self._offered = (key, _scan_offers(self.kind, path))
        return self._offered[1] or None

    def fingerprint(self, arch: str) -> str:
        """`identity`, or the reason there is none: changes whenever the source does."""
        try:
            return self.identity(arch)
        except (InstallError, OSError) as exc:
            return f"unavailable:{exc}"

    def origins(self, arches: Iterable[str]) -> dict[str, str]:
        """{arch: file} that `streams` would read for each arch of a directory source, found by
        stat alone (no file opened), so the package lookup can start before the installs; {}
        for a .deb (its control file names the package) or a source that cannot be read now."""
        if self.kind is SourceKind.DEB:
            return {}
        try:
            path = self.path
            dir_fd = open_trusted_dir(path)
        except (InstallError, OSError):
            return {}
        try:
            found = {}
            for arch in arches:
                with contextlib.suppress(InstallError, OSError):
                    name = pick_in_dir(dir_fd, path, arch)
                    if not isinstance(name, Missing):
                        found[arch] = os.path.join(path, name)
            return found
        finally:
            os.close(dir_fd)

    def streams(self, arches: Iterable[str]) -> Iterator[Found | Missing]:
        """A Found or a Missing for each of `arches`; one pass over a .deb.

        Raises InstallError when the whole source is unusable (missing, untrusted, corrupt).
        A Found's stream is valid until the next item is requested.
        """
        wanted = list(arches)
        if self.kind is SourceKind.DEB:
            yield from _deb_streams(self.path, wanted)
        else:
            yield from _dir_streams(self.path, wanted)


def _scan_offers(kind: SourceKind, path: str) -> frozenset[str]:
    from binfmtd.arch import CATALOG

    if kind is SourceKind.DEB:
        try:
            fd = open_trusted_file(path)
        except InstallError:
            return frozenset()
        try:
            names = {
                posixpath.basename(f)
                for f in deb.listed_files(fd, deb.ar_members(fd, path), path)
                if f.startswith("usr/bin/")
            }
        except deb.DebError:
            return frozenset()
        finally:
            os.close(fd)
    else:
        names = _listing(path)
    return frozenset(r.name for r in CATALOG if any(n in names for n in names_for(r.name)))


def find_auto_dir(dirs: Iterable[str]) -> str | None:
    """The first directory holding a `qemu-*-static`, else the first holding a catalog `qemu-A`."""
    from binfmtd.arch import CATALOG

    listed = {d: _listing(d) for d in dirs}
    for directory, names in listed.items():
        if any(n.startswith("qemu-") and n.endswith("-static") for n in names):
            return directory
    plain = {f"qemu-{row.name}" for row in CATALOG}
    for directory, names in listed.items():
        if plain & names:
            return directory
    return None


def _mtime_ns(directory: str) -> int:
    try:
        return os.stat(directory).st_mtime_ns
    except OSError:
        return -1


def _listing(directory: str) -> set[str]:
    try:
        return set(os.listdir(directory))
    except OSError:
        return set()


def _stat_id(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


# ---------------------------------------------------------------- trust (descriptor based)


def open_trusted_dir(path: str) -> int:
    """An O_DIRECTORY descriptor of `path`, which with every parent passes the trust rule."""
    return _trusted(path, lambda: trust.open_dir(path))


def open_trusted_file(path: str) -> int:
    """An O_RDONLY descriptor of the regular file `path`; it and its parents pass the rule."""
    return _trusted(path, lambda: trust.open_file(path))


def open_trusted_at(dir_fd: int, name: str, shown: str) -> int:
    """Open the regular file `name` of the already checked directory `dir_fd`, and check it."""
    return _trusted(shown, lambda: trust.open_file_at(dir_fd, name, shown))


def _trusted(shown: str, opener: Callable[[], int]) -> int:
    """Run a `trust` opener; its refusals and errors become InstallErrors naming the source."""
    try:
        return opener()
    except trust.TrustError as exc:
        raise InstallError(f"emulator source refused: {exc}") from None
    except OSError as exc:
        raise InstallError(f"emulator source {exc.filename or shown}: {exc.strerror}") from None


# ---------------------------------------------------------------- a directory


def _dir_streams(path: str, arches: list[str]) -> Iterator[Found | Missing]:
    dir_fd = open_trusted_dir(path)
    try:
        for arch in arches:
            name = pick_in_dir(dir_fd, path, arch)
            if isinstance(name, Missing):
                yield name
                continue
            shown = os.path.join(path, name)
            with os.fdopen(open_trusted_at(dir_fd, name, shown), "rb") as stream:
                yield Found(arch, stream, shown)
    finally:
        os.close(dir_fd)


def pick_in_dir(dir_fd: int, path: str, arch: str) -> str | Missing:
    """The name of the regular file in `dir_fd` that holds `arch`'s emulator, links resolved."""
    for name in names_for(arch):
        resolved = _resolve_in_dir(dir_fd, path, name)
        if resolved is not None:
            return resolved
    static, plain = names_for(arch)
    return Missing(arch, f"source {path} has no {static} or {plain} ({_PACKAGES})")


def _resolve_in_dir(dir_fd: int, path: str, name: str) -> str | None:
    """`name` itself, or the file its same-directory symlink chain ends at; None if absent."""
    first = name
    for hop in range(MAX_LINK_HOPS):
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            if hop == 0:
                return None
            raise InstallError(
                f"{path}/{first} is a symbolic link to {name}, which does not exist in {path}"
            ) from None
        if not stat.S_ISLNK(st.st_mode):
            return name
        target = os.readlink(name, dir_fd=dir_fd)
        if "/" in target or target in (".", ".."):
            raise InstallError(
                f"{path}/{name} is a symbolic link to {target}, outside {path}: binfmtd follows "
                f"links only to files in the same directory; set source.path to the directory "
                f"that holds the emulator"
            )
        name = target
    raise InstallError(f"{path}/{first}: more than {MAX_LINK_HOPS} symbolic links in a chain")


# ---------------------------------------------------------------- a .deb


def _deb_streams(path: str, arches: list[str]) -> Iterator[Found | Missing]:
    fd = open_trusted_file(path)
    try:
        yield from _read_deb(fd, path, arches)
    except deb.DebError as exc:
        raise InstallError(str(exc)) from None
    finally:
        os.close(fd)


def _read_deb(fd: int, path: str, arches: list[str]) -> Iterator[Found | Missing]:
    members = deb.ar_members(fd, path)
    control = deb.control_fields(fd, members, path)
    package, version = control.get("Package"), control.get("Version")
    data = deb.find_member(members, "data.tar", path)
    where = f"{path}: {data.name}"
    wanted = {f"usr/bin/{n}": a for a in arches for n in names_for(a)}
    links: dict[str, str] = {}
    done: set[str] = set()
    with deb.open_tar(fd, data, path, deb.data_limit(data)) as tar:
        for member in deb.checked_members(tar, where):
            name = posixpath.normpath(member.name.lstrip("/"))
            arch = wanted.get(name)
            if arch is None or arch in done:
                continue
            if member.issym() or member.islnk():
                links.setdefault(arch, f"{name} -> {member.linkname}")
            elif member.isreg():
                done.add(arch)
                stream = deb.member_stream(tar, member, where)
                yield Found(arch, stream, f"{path}:{name}", package, version)
    for arch in arches:
        if arch not in done:
            yield Missing(arch, _deb_missing(path, arch, links.get(arch)))


def _deb_missing(path: str, arch: str, link: str | None) -> str:
    static, plain = names_for(arch)
    if link is None:
        return f"{path} has no usr/bin/{static} or usr/bin/{plain} ({_PACKAGES})"
    return (
        f"{path} has {link}, a link to a file this package does not contain (Debian 13's "
        f"qemu-user-static is a transitional package of links): use the qemu-user .deb, "
        f"which holds the emulators"
    )


# ---------------------------------------------------------------- which package a file is from


class PackageOwners:
    """A package lookup (`packages_of`) running on its own thread: `asked` the files it was
    given, `result()` waits for {file: (package, version)}."""

    __slots__ = ("_future", "asked")

    def __init__(self, asked: frozenset[str], future: Future[dict[str, tuple[str, str]]]) -> None:
        self.asked = asked
        self._future = future

    def result(self) -> dict[str, tuple[str, str]]:
        """{file: (package, version)} for the asked files a package owns (waits for it)."""
        return self._future.result()


def packages_soon(origins: Mapping[str, str]) -> PackageOwners | None:
    """Start `packages_of` (dpkg-query: ~80 ms of CPU, it reads every package's file list)
    for the files of `origins` ({arch: file}) on its own thread; None when there is none.
    Its fork waits while an install holds a file open for writing (`run.FORKS`)."""
    if not origins:
        return None
    paths = frozenset(origins.values())
    pool = ThreadPoolExecutor(1, thread_name_prefix="packages")
    try:
        return PackageOwners(paths, pool.submit(packages_of, paths))
    finally:
        pool.shutdown(wait=False)


def packages_of(paths: Iterable[str]) -> dict[str, tuple[str, str]]:
    """{path: (package, version)} for the installed files the package manager knows.

    Asks dpkg-query (Debian, Ubuntu) and then rpm (Fedora; only where the system's RPM database
    is at /var/lib/rpm, not for an rpm tool on a Debian host) when present; files no package
    owns are left out. Never raises: a missing tool or a failing query just knows less.
    """
    todo = list(dict.fromkeys(paths))
    found: dict[str, tuple[str, str]] = {}
    if todo and shutil.which("dpkg-query") and os.path.isdir("/var/lib/dpkg"):
        found.update(_dpkg_owners(todo))
    rest = [p for p in todo if p not in found]
    if rest and shutil.which("rpm") and os.path.isdir(RPM_DB):
        found.update(_rpm_owners(rest))
    return found


def _dpkg_owners(paths: list[str]) -> dict[str, tuple[str, str]]:
    result = run(["dpkg-query", "-S", *paths], timeout=30, check=False)
    owner: dict[str, str] = {}
    for line in result.stdout.decode(errors="replace").splitlines():
        pkgs, sep, file = line.rpartition(": ")
        if sep and file in paths and "," not in pkgs and not line.startswith("diversion "):
            owner[file] = pkgs.strip()
    if not owner:
        return {}
    fmt = "${binary:Package}\t${Package}\t${Version}\n"
    result = run(["dpkg-query", "-W", "-f", fmt, *set(owner.values())], timeout=30, check=False)
    versions: dict[str, str] = {}
    for line in result.stdout.decode(errors="replace").splitlines():
        fields = line.split("\t")
        if len(fields) == 3:
            versions[fields[0]] = versions[fields[1]] = fields[2]
    return {f: (p.split(":")[0], versions[p]) for f, p in owner.items() if p in versions}


def _rpm_owners(paths: list[str]) -> dict[str, tuple[str, str]]:
    paths = [p for p in paths if os.path.exists(p)]  # a missing one prints no line at all
    if not paths:
        return {}
    fmt = "%{NAME}\t%{EPOCHNUM}:%{VERSION}-%{RELEASE}\n"
    argv = ["rpm", "--dbpath", RPM_DB, "-qf", "--queryformat", fmt, *paths]
    result = run(argv, timeout=30, check=False)
    lines = result.stdout.decode(errors="replace").splitlines()
    if len(lines) != len(paths):  # one line per path, owned or not; anything else is unclear
        return {}
    found = {}
    for path, line in zip(paths, lines, strict=True):
        name, sep, version = line.partition("\t")
        if sep:
            found[path] = (name, version.removeprefix("0:"))
    return found
