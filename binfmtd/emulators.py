"""Installing static QEMU emulators: checks, atomic writes, checksums, the state file.

Where the bytes come from is `binfmtd.sources`.

An emulator reaches its final path only by rename(2) of a temp file that was fully written,
fsynced, checked (ELF, static, host machine) and checksummed; so a registered interpreter is
never partial. The state file is written the same way.

Checksums are strings prefixed with their algorithm: `blake3:<64 hex>` for what this version
installs (BLAKE3, a cryptographic hash several times faster than sha256 on one core), and
`sha256:<64 hex>` read from older state files, still verified with sha256.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import mmap
import os
import stat
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import IO, Protocol, TypeVar

import blake3

from binfmtd import elf, trust
from binfmtd.run import FORKS, run

CHUNK = 1 << 20
T = TypeVar("T")
TEMP_PREFIX = ".binfmtd-tmp-"
STATE_MAX_BYTES = 4 << 20

ALGORITHM = "blake3"


class _Hash(Protocol):
    def update(self, data: memoryview, /) -> object: ...
    def hexdigest(self) -> str: ...


def _sha256() -> _Hash:
    import hashlib  # only for a state file from before BLAKE3: its libcrypto is ~3.5 MB of RSS

    return hashlib.sha256()


# The algorithms a checksum may name. BLAKE3 hashes ~5 GB/s on one AVX2/AVX-512 core here,
# sha256 (SHA-NI) ~1 GB/s: for 33 emulators (~390 MB) 80 ms of CPU instead of 420 ms.
# One thread per file: installs already hash several files at once.
HASHES: dict[str, Callable[[], _Hash]] = {"blake3": blake3.blake3, "sha256": _sha256}


class InstallError(RuntimeError):
    """An emulator that could not be installed, and why."""


@dataclass(frozen=True)
class Installed:
    """What the state file records for one installed emulator."""

    arch: str
    path: str
    checksum: str  # `blake3:<hex>` (`sha256:<hex>` from a state file before BLAKE3)
    version: str | None
    source: str
    source_id: str
    installed_at: float
    file_id: str = ""  # stat identity at install; unchanged means no need to hash again
    origin: str = ""  # the source file (or `<deb>:<member>`) the bytes were taken from
    package: str | None = None  # the package that shipped it (dpkg-query, rpm -qf, .deb control)
    package_version: str | None = None
    method: str = "copy"  # a Method; "link" shares the source's inode


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


def checksum_of(
    path: str, *, algorithm: str = ALGORITHM, linked_inode: int | None = None
) -> str | None:
    """`<algorithm>:<hex>` of a root-owned regular file nobody else may write, else None (not
    trusted, unreadable, or an algorithm binfmtd does not know).

    A copy must have a single link: another name means someone meddled (a planted hard link).
    An emulator installed by hard link shares its inode with the source: that inode (and only
    that one, `linked_inode`) may have other names; writing it still needs root or a
    group/other write bit, and both are checked.
    """
    if algorithm not in HASHES:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not _root_only(st) or (st.st_nlink != 1 and st.st_ino != linked_inode):
            return None
        return _digest_fd(fd, None, algorithm).checksum
    except OSError:
        return None
    finally:
        os.close(fd)


def matches(path: str, checksum: str, *, linked_inode: int | None = None) -> bool:
    """True when `path` is trusted (see checksum_of) and its bytes have `checksum`, computed
    with the algorithm the checksum names (so a `sha256:` record of an old state file still
    verifies without a reinstall)."""
    algorithm = checksum.partition(":")[0]
    return checksum_of(path, algorithm=algorithm, linked_inode=linked_inode) == checksum


def _root_only(st: os.stat_result) -> bool:
    """A regular file only root can change."""
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    return stat.S_ISREG(st.st_mode) and st.st_uid == 0 and not writable


def qemu_version(path: str) -> str | None:
    """The first line of `qemu-X --version`, e.g. "qemu-aarch64 version 7.2.19 (Debian ...)"."""
    result = run([path, "--version"], timeout=10, check=False)
    if result.returncode != 0 or result.timed_out:
        return None
    line = result.stdout.decode(errors="replace").splitlines()[:1]
    return line[0].strip() if line else None


# ---------------------------------------------------------------- hashing, once per identity


@dataclass(frozen=True)
class Digest:
    """What reading an emulator's bytes once tells: its checksum (`<algorithm>:<hex>`) and the
    QEMU version it prints."""

    checksum: str
    version: str | None


class _Scan:
    """A checksum over chunks, and the `qemu-<arch> version ...` line QEMU prints for --version
    (a literal in the binary: found while hashing, so no process has to run for it)."""

    def __init__(self, arch: str | None, algorithm: str = ALGORITHM, search_from: int = 0) -> None:
        self.algorithm = algorithm
        self.hash = HASHES[algorithm]()
        self.marker = f"qemu-{arch} version ".encode() if arch else b""
        self.version: str | None = None
        self.search_from = search_from  # the literal is not in the code: skip scanning it
        self._tail = b""
        self._taken = 0

    def update(self, data: bytes | bytearray | mmap.mmap, count: int) -> None:
        """Take the first `count` bytes of `data`."""
        with memoryview(data) as view:
            self.hash.update(view[:count])  # releases the GIL: threads hash files at once
        self._taken += count
        if self.version is not None or not self.marker or self._taken <= self.search_from:
            return
        edge = self._tail + bytes(data[: min(count, VERSION_MAX)])
        self.version = _version_in(edge, self.marker, len(edge)) or _version_in(
            data, self.marker, count
        )
        self._tail = bytes(data[max(0, count - len(self.marker) - VERSION_MAX) : count])

    def result(self) -> Digest:
        """The digest of everything taken."""
        return Digest(f"{self.algorithm}:{self.hash.hexdigest()}", self.version)


VERSION_MAX = 200


def _version_in(data: bytes | bytearray | mmap.mmap, marker: bytes, count: int) -> str | None:
    """The version line at `marker` in the first `count` bytes, when whole and printable."""
    at = data.find(marker, 0, count)
    end = data.find(b"\n", at, min(count, at + VERSION_MAX)) if at >= 0 else -1
    line = bytes(data[at:end]) if end >= 0 else b""
    if not line or not line.isascii() or not line.decode("ascii").isprintable():
        return None
    return line.decode("ascii")


def _digest_fd(
    fd: int, arch: str | None, algorithm: str = ALGORITHM, search_from: int = 0
) -> Digest:
    """Read an open file from its start: its checksum (and QEMU version when `arch` is given,
    looked for from the chunk holding byte `search_from` on)."""
    scan = _Scan(arch, algorithm, search_from)
    # A mapping of its own, unmapped on return: a freed 1 MB malloc buffer raises glibc's mmap
    # threshold and stays in the install thread's arena (~6 MB of idle RSS after a cold start).
    buffer = mmap.mmap(-1, CHUNK)
    offset = 0
    with buffer:
        while count := os.preadv(fd, [buffer], offset):
            scan.update(buffer, count)
            offset += count
    return scan.result()


def _identity(st: os.stat_result) -> str:
    """(device, inode, size, mtime, ctime): any write changes mtime and ctime, and ctime cannot
    be set from user space, so bytes under an unchanged identity are unchanged.

    ctime also moves when a link is added or removed, so the entry binfmtd records after its
    own hard link (and rename) goes stale once that link is removed. Accepting "ctime moved
    but st_nlink changed and size/mtime are equal" was considered and rejected: a rewrite in
    place with mtime restored by utimensat plus any link or unlink (by anyone) looks exactly
    the same to stat(2), and no stat field tells who changed the link count. The price of the
    miss is one BLAKE3 pass (about 2 ms of CPU per emulator)."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


class HashCache:
    """Digests per file identity, so a source file is read once, not at every install.

    Kept in the state file; thread-safe (installs run in parallel). Bounded: the oldest
    identities are dropped first.
    """

    LIMIT = 256

    def __init__(self, entries: dict[str, Digest] | None = None) -> None:
        self._entries = dict(entries or {})
        self._lock = threading.Lock()

    def get(self, st: os.stat_result) -> Digest | None:
        """The digest recorded for this identity, if any."""
        with self._lock:
            return self._entries.get(_identity(st))

    def put(self, st: os.stat_result, digest: Digest) -> Digest:
        """Record `digest` for this identity; returns it."""
        with self._lock:
            self._entries[_identity(st)] = digest
            while len(self._entries) > self.LIMIT:
                del self._entries[next(iter(self._entries))]
        return digest

    def to_json(self) -> dict[str, list[str | None]]:
        """{identity: [checksum, version]} for the state file."""
        with self._lock:
            return {k: [d.checksum, d.version] for k, d in self._entries.items()}

    @classmethod
    def from_json(cls, data: object) -> HashCache:
        """The inverse of to_json; anything malformed is dropped (it only costs a re-read).
        A bare hex digest (a state file from before checksums named their algorithm) is sha256."""
        entries: dict[str, Digest] = {}
        if isinstance(data, dict):
            for key, value in data.items():
                if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                    version = value[1] if isinstance(value[1], str) else None
                    entries[str(key)] = Digest(named_checksum(value[0]), version)
        return cls(entries)


def named_checksum(text: str) -> str:
    """`text` with its algorithm named: a bare hex digest (state files before BLAKE3) is
    `sha256:<hex>`."""
    return text if ":" in text else f"sha256:{text}"


# ---------------------------------------------------------------- the atomic install


class Method(StrEnum):
    """How an emulator's bytes reached the install directory, cheapest first."""

    LINK = "link"  # a hard link to the source's inode: nothing copied
    REFLINK = "reflink"  # FICLONE: shared extents, copy-on-write
    COPY = "copy"  # copy_file_range: copied inside the kernel
    STREAM = "stream"  # read and written through userspace (a member of a .deb)


@dataclass(frozen=True)
class Written:
    """One installed emulator."""

    path: str
    checksum: str
    method: Method
    version: str | None


def install_stream(
    stream: IO[bytes],
    arch: str,
    dest_dir: str,
    host_machine: int | None,
    *,
    allow_link: bool = True,
    hashes: HashCache | None = None,
    sync_dir: bool = True,
) -> Written:
    """Check, checksum and install one emulator as `dest_dir/qemu-<arch>`.

    A stream over a plain file (`open(path, "rb")`, `os.fdopen(fd, "rb")`) is installed without
    reading it through Python: by hard link when `allow_link` and the file is root:root 0755 on
    the same filesystem, else by FICLONE, else by copy_file_range; its digest comes from
    `hashes` when the file's identity is known. Any other stream (a .deb member) is copied.
    Nothing reaches the final name unless every check passed. A file being written is open
    only inside `run.FORKS.writing()` (no child can take its descriptor along).

    `sync_dir`: fsync `dest_dir` after the rename. False leaves that to the caller, who
    installs several emulators and makes all their names durable with one fsync_dir before
    recording them. Raises InstallError.
    """
    source = _plain_file(stream)
    if source is not None:
        done = _install_file(source, arch, dest_dir, host_machine, allow_link, hashes)
    else:
        done = _install_bytes(stream, arch, dest_dir, host_machine)
    if sync_dir:
        fsync_dir(dest_dir)
    return done


def _plain_file(stream: IO[bytes]) -> int | None:
    """The fd of a buffered reader over a regular file read from its start, else None."""
    raw = getattr(stream, "raw", None)
    if not isinstance(raw, io.FileIO) or raw.closed:
        return None
    fd = raw.fileno()
    if stream.tell() != 0 or not stat.S_ISREG(os.fstat(fd).st_mode):
        return None
    return fd


def _install_file(
    src: int,
    arch: str,
    dest_dir: str,
    host_machine: int | None,
    allow_link: bool,
    hashes: HashCache | None,
) -> Written:
    before = os.fstat(src)
    code_end = _check_elf(src, before.st_size, host_machine, arch)
    cache = hashes if hashes is not None else HashCache()
    digest = cache.get(before) or cache.put(before, _digest_fd(src, arch, search_from=code_end))
    tmp, method = None, Method.LINK
    try:
        if allow_link and _linkable(before, dest_dir):
            tmp = _link_temp(src, dest_dir)
        if tmp is None:
            tmp, method = _write_temp(dest_dir, lambda fd: _clone_or_copy(src, fd, before.st_size))
        after = os.fstat(src)
        if _content_key(after) != _content_key(before):
            raise InstallError(f"qemu-{arch} changed in the source while being installed")
        dest = _place(tmp, dest_dir, arch)
    except BaseException:
        _discard(-1, tmp)
        raise
    if method is Method.LINK:  # our link and rename changed the inode's ctime, not its bytes
        placed = os.fstat(src)
        if _content_key(placed) == _content_key(before):
            cache.put(placed, digest)
    return Written(dest, digest.checksum, method, digest.version)


def file_id(path: str) -> str | None:
    """What `path` is now (inode, size, mtime, ctime, mode, owner; not following a symlink):
    recorded at install, an unchanged one needs no hashing. None when it cannot be read."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_mode}:{st.st_uid}"


def installed_as_made(ident: str) -> bool:
    """Whether a `file_id` is a file as binfmtd installs one: regular, owned by root, mode
    0755 (no setuid/setgid bit, writable by root alone). Bytes with the right checksum under
    another mode or owner are not: a setuid-root QEMU runs anything as root for whoever
    starts it, and a file a user owns can be changed before it is registered again."""
    fields = ident.split(":")
    try:
        mode, uid = int(fields[4]), int(fields[5])
    except (IndexError, ValueError):
        return False
    return stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o755 and uid == 0


def _content_key(st: os.stat_result) -> tuple[int, int, int, int]:
    """What a write changes (ctime also moves when a link is added, so it is left out)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _linkable(st: os.stat_result, dest_dir: str) -> bool:
    """A hard link is installed as is, so the source inode must already be what a copy gets."""
    owner = (st.st_uid, st.st_gid) == (0, 0)
    return owner and stat.S_IMODE(st.st_mode) == 0o755 and os.stat(dest_dir).st_dev == st.st_dev


def _link_temp(src: int, dest_dir: str) -> str | None:
    """A new name in `dest_dir` for the inode open as `src` (the opened file, not whatever its
    path names now); None when this filesystem or kernel refuses."""
    try:
        fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        for _ in range(8):
            # secrets.token_hex's bytes, without importing secrets (hmac: libcrypto, ~3.5 MB)
            tmp = os.path.join(dest_dir, TEMP_PREFIX + os.urandom(8).hex())
            try:  # linkat(AT_SYMLINK_FOLLOW) on the fd's magic link: the inode we checked
                os.link(str(src), tmp, src_dir_fd=fds, follow_symlinks=True)
            except FileExistsError:
                continue
            except OSError:
                return None
            return tmp
        return None
    finally:
        os.close(fds)


def _clone_or_copy(src: int, dst: int, size: int) -> Method:
    """Share the extents (FICLONE) where the filesystem can, else copy inside the kernel."""
    try:
        fcntl.ioctl(dst, FICLONE, src)
    except OSError as exc:
        if exc.errno not in _NO_CLONE:
            raise InstallError(f"cloning the emulator failed: {exc.strerror}") from None
    else:
        return Method.REFLINK
    copied = 0
    in_range = True
    try:
        while copied < size:
            if in_range:
                try:
                    count = os.copy_file_range(src, dst, size - copied, copied, copied)
                except OSError as exc:  # another filesystem, on kernels that refuse that
                    if copied or exc.errno not in _NO_CLONE:
                        raise
                    in_range = False
                    continue
            else:  # writes at dst's offset, still 0 when the first copy_file_range failed
                count = os.sendfile(dst, src, copied, size - copied)
            if count == 0:
                break
            copied += count
    except OSError as exc:
        raise InstallError(f"copying the emulator failed: {exc.strerror}") from None
    if copied != size:
        raise InstallError(f"copying the emulator stopped at {copied} of {size} bytes")
    return Method.COPY


FICLONE = 0x40049409
_NO_CLONE = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS}


def _install_bytes(
    stream: IO[bytes], arch: str, dest_dir: str, host_machine: int | None
) -> Written:
    def fill(fd: int) -> Digest:
        digest, size = _copy(stream, fd, arch)
        _check_elf(fd, size, host_machine, arch)
        return digest

    tmp, digest = _write_temp(dest_dir, fill)
    try:
        dest = _place(tmp, dest_dir, arch)
    except BaseException:
        _discard(-1, tmp)
        raise
    return Written(dest, digest.checksum, Method.STREAM, digest.version)


def _write_temp(dest_dir: str, fill: Callable[[int], T]) -> tuple[str, T]:
    """A new temp file in `dest_dir` written by `fill(fd)`, then sealed (root:root 0755, on
    disk) and closed, all inside `FORKS.writing()`; removed again if anything fails."""
    with FORKS.writing():
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=dest_dir)
        try:
            result = fill(fd)
            _seal(fd)
        except BaseException:
            _discard(fd, tmp)
            raise
        os.close(fd)
    return tmp, result


def _seal(fd: int) -> None:
    """root:root 0755, on disk."""
    os.fchown(fd, 0, 0)
    os.fchmod(fd, 0o755)
    os.fsync(fd)


def _place(tmp: str, dest_dir: str, arch: str) -> str:
    """Rename `tmp` over the final name (made durable by fsync_dir(dest_dir), see
    install_stream)."""
    dest = os.path.join(dest_dir, f"qemu-{arch}")
    try:
        os.rename(tmp, dest)
    except OSError as exc:
        if exc.errno not in {errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.EBUSY}:
            raise
        raise InstallError(
            f"cannot install qemu-{arch}: {dest} is in the way ({exc.strerror}: not a file "
            f"binfmtd made; a directory or a mount point): remove it, binfmtd installs at once"
        ) from None
    if os.path.lexists(tmp):  # rename(2) does nothing when both names are one inode
        os.unlink(tmp)
    return dest


def destination_id(dest_dir: str, arch: str) -> str:
    """What sits where qemu-`arch` is installed, and the install directory itself (type,
    mode, owner, inode; never the directory's mtime, which every temp file changes): a
    failing install is retried at once when this changes (an obstacle removed, a mode
    fixed), not after its backoff. "-" for a name that does not exist."""
    parts = []
    for path in (dest_dir, os.path.join(dest_dir, f"qemu-{arch}")):
        try:
            st = os.lstat(path)
        except OSError:
            parts.append("-")
            continue
        parts.append(f"{st.st_mode:o}.{st.st_uid}.{st.st_gid}.{st.st_dev}.{st.st_ino}")
    return "/".join(parts)


def _discard(fd: int, tmp: str | None) -> None:
    if fd >= 0:
        os.close(fd)
    if tmp is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _copy(stream: IO[bytes], fd: int, arch: str) -> tuple[Digest, int]:
    scan = _Scan(arch)
    size = 0
    while chunk := stream.read(CHUNK):
        scan.update(chunk, len(chunk))
        view = memoryview(chunk)
        while view:
            try:
                written = os.write(fd, view)
            except OSError as exc:
                raise InstallError(f"writing the emulator failed: {exc.strerror}") from None
            view = view[written:]
        size += len(chunk)
    return scan.result(), size


def _check_elf(fd: int, size: int, host_machine: int | None, arch: str) -> int:
    """Refuse what is not a static emulator for this host; returns where its code ends."""
    head = os.pread(fd, elf.HEADER_READ, 0)
    try:
        info = elf.parse_header(head)
        table = os.pread(fd, info.phentsize * info.phnum, info.phoff)
        elf.check_static_emulator(head, table, size, host_machine)
    except elf.ElfError as exc:
        raise InstallError(f"qemu-{arch} from the source is unusable: {exc}") from None
    return _code_end(info, table)


def _code_end(info: elf.ElfInfo, table: bytes) -> int:
    """The file offset where the last executable PT_LOAD segment ends (0 if none).

    QEMU's version line is a string literal, so it lies in read-only data, which linkers put
    after the code: looking for it only from there saves scanning about half of each file.
    Were it elsewhere, the version is read by running `--version` instead (nothing is lost)."""
    order = "<" if info.little_endian else ">"
    wide = info.elf_class == 2
    end = 0
    for i in range(info.phnum):
        at = i * info.phentsize
        p_type, flags_64 = struct.unpack_from(order + "II", table, at)
        if wide:
            offset, filesz, flags = *struct.unpack_from(order + "Q24xQ", table, at + 8), flags_64
        else:
            offset, filesz, flags = struct.unpack_from(order + "I8xI4xI", table, at + 4)
        if p_type == PT_LOAD and flags & PF_X:
            end = max(end, offset + filesz)
    return end


PT_LOAD, PF_X = 1, 1


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
    *,
    hashes: HashCache | None = None,
    durable: bool = True,
    operator_disabled: Iterable[str] = (),
) -> None:
    """Replace the state file atomically (temp, fsync, rename, fsync dir).

    `flags`: the binfmt_misc flags the entries are registered with (recorded so that a later
    version can tell what an install relied on). `owned` is the ownership record: every
    binfmt_misc entry binfmtd registered, name -> register string. Only those entries are
    binfmtd's (see `read_owned`). `hashes`: the digest cache, kept beside.
    `operator_disabled`: the arches `binfmtctl disable` switched off (QEMU names), so that a
    restarted binfmtd keeps them off (see `read_operator_disabled`).

    `durable=False` skips both fsyncs: the new file is still whole for any process that reads
    it after binfmtd is killed (a kill loses no written page), only a power loss or kernel
    crash may bring back an older state file. That is enough for a record written ahead of a
    binfmt_misc entry, which such a crash removes as well; the caller writes durably later.
    """
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    doc: dict[str, object] = {"version": 1}
    if flags is not None:
        doc["flags"] = flags
    doc["emulators"] = {k: _fields(v) for k, v in sorted(installed.items())}
    if owned is not None:
        doc["entries"] = dict(sorted(owned.items()))
    if hashes is not None:
        doc["hashes"] = hashes.to_json()
    doc["operator_disabled"] = sorted(set(operator_disabled))
    body = json.dumps(doc, indent=2).encode()
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    try:
        os.write(fd, body)
        os.fchmod(fd, 0o644)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.rename(tmp, path)
    except OSError:
        os.unlink(tmp)
        raise
    if durable:
        fsync_dir(directory)


def _fields(record: Installed) -> dict[str, object]:
    """A record as a flat dict (its fields are all plain values: no deep copy as asdict does)."""
    return {f.name: getattr(record, f.name) for f in fields(record)}


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
        return {k: _installed(v) for k, v in data["emulators"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, trust.TrustError):
        return {}


def _installed(fields: dict[str, object]) -> Installed:
    """One state file record; a record from before BLAKE3 has `sha256` (bare hex) instead of
    `checksum`, and keeps verifying with sha256."""
    fields = dict(fields)
    old = fields.pop("sha256", None)
    if "checksum" not in fields and isinstance(old, str):
        fields["checksum"] = named_checksum(old)
    return Installed(**fields)  # type: ignore[arg-type]


def read_hashes(path: str) -> HashCache:
    """The digest cache kept in the state file (empty when missing or unreadable)."""
    try:
        data = json.loads(trust.read_file(path, max_bytes=STATE_MAX_BYTES))
        return HashCache.from_json(data.get("hashes"))
    except (OSError, ValueError, AttributeError, trust.TrustError):
        return HashCache()


def read_operator_disabled(path: str) -> set[str]:
    """The arches the operator disabled (`binfmtctl disable`), as the state file at `path`
    records them: QEMU names; empty when the file is missing, unreadable, untrusted or from
    before the record (binfmtd then had no memory of it across a restart)."""
    try:
        names = json.loads(trust.read_file(path, max_bytes=STATE_MAX_BYTES))["operator_disabled"]
    except (OSError, ValueError, KeyError, TypeError, trust.TrustError):
        return set()
    if not isinstance(names, list):
        return set()
    return {name for name in names if isinstance(name, str)}


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
