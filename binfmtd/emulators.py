"""Installing static QEMU emulators: checks, atomic writes, checksums, the state file.

Where the bytes come from is `binfmtd.sources`.

An emulator reaches its final path only by rename(2) of a temp file that was fully written,
fsynced, checked (ELF, static, host machine) and checksummed; so a registered interpreter is
never partial. The state file is written the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import IO

from binfmtd import elf, trust
from binfmtd.run import run

CHUNK = 1 << 20
TEMP_PREFIX = ".binfmtd-tmp-"
STATE_MAX_BYTES = 4 << 20


class InstallError(RuntimeError):
    """An emulator that could not be installed, and why."""


@dataclass(frozen=True)
class Installed:
    """What the state file records for one installed emulator."""

    arch: str
    path: str
    sha256: str
    version: str | None
    source: str
    source_id: str
    installed_at: float
    file_id: str = ""  # stat identity at install; unchanged means no need to hash again
    origin: str = ""  # the source file (or `<deb>:<member>`) the bytes were taken from
    package: str | None = None  # the package that shipped it (dpkg-query, rpm -qf, .deb control)
    package_version: str | None = None


# ---------------------------------------------------------------- install directory safety


def check_trusted_path(path: str) -> None:
    """Refuse an install directory that a non-root user could change (the rule in `trust`).

    Whoever can replace an interpreter runs code in every emulated process, as root with the
    C flag. Raises InstallError with the chown/chmod to run.
    """
    try:
        trust.check_dir(path)
    except (trust.TrustError, OSError) as exc:
        raise InstallError(str(exc)) from None


def ensure_install_dir(path: str) -> None:
    """Create the install directory (0755, root) and check it and its parents."""
    try:
        os.close(trust.open_dir(path, create_mode=0o755))
    except (trust.TrustError, OSError) as exc:
        raise InstallError(str(exc)) from None
    clean_temp_files(path)


def clean_temp_files(path: str) -> list[str]:
    """Remove temp files a killed install left behind; they were never registered."""
    removed = []
    for name in os.listdir(path):
        if name.startswith(TEMP_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(path, name))
            removed.append(name)
    return removed


# ---------------------------------------------------------------- checks of installed files


def sha256_of(path: str) -> str | None:
    """sha256 of a root-owned regular file with a single link, else None (not trusted)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_nlink != 1:
            return None
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return None
        digest = hashlib.sha256()
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def qemu_version(path: str) -> str | None:
    """The first line of `qemu-X --version`, e.g. "qemu-aarch64 version 7.2.19 (Debian ...)"."""
    result = run([path, "--version"], timeout=10, check=False)
    if result.returncode != 0 or result.timed_out:
        return None
    line = result.stdout.decode(errors="replace").splitlines()[:1]
    return line[0].strip() if line else None


# ---------------------------------------------------------------- the atomic install


def install_stream(
    stream: IO[bytes], arch: str, dest_dir: str, host_machine: int | None
) -> tuple[str, str]:
    """Copy, check and checksum one emulator, then rename it to `dest_dir/qemu-<arch>`.

    Returns (path, sha256). Nothing reaches the final name unless every check passed.
    """
    dest = os.path.join(dest_dir, f"qemu-{arch}")
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=dest_dir)
    try:
        digest, size = _copy(stream, fd)
        _check_written(fd, size, host_machine, arch)
        os.fchown(fd, 0, 0)
        os.fchmod(fd, 0o755)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, dest)
        fsync_dir(dest_dir)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return dest, digest


def _copy(stream: IO[bytes], fd: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
        view = memoryview(chunk)
        while view:
            try:
                written = os.write(fd, view)
            except OSError as exc:
                raise InstallError(f"writing the emulator failed: {exc.strerror}") from None
            view = view[written:]
        size += len(chunk)
    return digest.hexdigest(), size


def _check_written(fd: int, size: int, host_machine: int | None, arch: str) -> None:
    head = os.pread(fd, elf.HEADER_READ, 0)
    try:
        info = elf.parse_header(head)
        table = os.pread(fd, info.phentsize * info.phnum, info.phoff)
        elf.check_static_emulator(head, table, size, host_machine)
    except elf.ElfError as exc:
        raise InstallError(f"qemu-{arch} from the source is unusable: {exc}") from None


def fsync_dir(path: str) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the state file


def write_state(
    path: str,
    installed: dict[str, Installed],
    flags: str | None = None,
    owned: Mapping[str, str] | None = None,
) -> None:
    """Replace the state file atomically (temp, fsync, rename, fsync dir).

    `flags`: the binfmt_misc flags the entries are registered with (recorded so that a later
    version can tell what an install relied on). `owned` is the ownership record: every
    binfmt_misc entry binfmtd registered, name -> register string. Only those entries are
    binfmtd's (see `read_owned`).
    """
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    doc: dict[str, object] = {"version": 1}
    if flags is not None:
        doc["flags"] = flags
    doc["emulators"] = {k: asdict(v) for k, v in sorted(installed.items())}
    if owned is not None:
        doc["entries"] = dict(sorted(owned.items()))
    body = json.dumps(doc, indent=2).encode()
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    try:
        os.write(fd, body)
        os.fchmod(fd, 0o644)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.rename(tmp, path)
    except OSError:
        os.unlink(tmp)
        raise
    fsync_dir(directory)


def read_state_flags(path: str) -> str | None:
    """The flags the state file records; "" for a state file from before they were recorded
    (binfmtd 0.1), None when there is no readable state file."""
    try:
        with open(path, "rb") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    flags = data.get("flags", "") if isinstance(data, dict) else None
    return flags if isinstance(flags, str) else None


def read_state(path: str) -> dict[str, Installed]:
    """The recorded emulators; a missing, unreadable or untrusted file means none are trusted."""
    try:
        data = json.loads(trust.read_file(path, max_bytes=STATE_MAX_BYTES))
        return {k: Installed(**v) for k, v in data["emulators"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, trust.TrustError):
        return {}


def read_owned(path: str) -> dict[str, str] | None:
    """The ownership record (entry name -> register string); None when the file predates it
    (or cannot be read): the caller then adopts entries running exactly its recorded emulators."""
    try:
        entries = json.loads(trust.read_file(path, max_bytes=STATE_MAX_BYTES))["entries"]
    except (OSError, ValueError, KeyError, TypeError, trust.TrustError):
        return None
    if not isinstance(entries, dict):
        return None
    return {str(k): str(v) for k, v in entries.items() if isinstance(v, str)}
