"""Reading a Debian package without dpkg: its ar members, control fields and data tarball.

A .deb is an ar archive holding `debian-binary`, `control.tar.*` and `data.tar.*`. The ar
layer is parsed here (it has no well-kept Python library and is 60-byte headers); everything
inside the tarballs goes through `tarfile`, with the stdlib's `data_filter` applied to every
member. Every malformed input becomes a `DebError` naming the file and what is wrong with it:
truncated archives, sizes that are not plain decimals or run past the end, compression that
does not match the member's name (xz, gz, bz2, zst as Ubuntu builds them, or none), path
traversal or links leaving the tree, members larger than `MAX_MEMBER_BYTES`, and
decompression bombs (output capped by `data_limit`). Nothing here raises anything else, and
nothing loops without reading: every step consumes input.

Works on an already opened (and trust-checked) file descriptor; reads it with pread, so the
caller's offset does not matter.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

from binfmtd.emulators import InstallError

AR_MAGIC = b"!<arch>\n"
AR_HEADER = 60
MAX_AR_MEMBERS = 16  # a .deb has 3; anything far beyond is not a package
MAX_MEMBER_BYTES = 256 << 20  # one emulator (Debian's are 5-30 MB)
MAX_CONTROL_BYTES = 1 << 20  # the control file itself
MAX_DATA_BYTES = 4 << 30  # everything a data.tar may decompress to
BOMB_RATIO = 32  # decompressed/compressed beyond this (above a floor) is a bomb
BOMB_FLOOR = 64 << 20
CHUNK = 1 << 20
# Where tarfile's data_filter imagines the tree: it must not exist, so realpath() of a member
# never resolves through the host's filesystem.
_FILTER_ROOT = "/nonexistent/binfmtd-deb-root"

# Exceptions the decompressors and tarfile raise on corrupt input.
CORRUPT = (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, OSError, ValueError)


class DebError(InstallError):
    """A .deb that cannot be used, already phrased for the operator (names the file)."""


@dataclass(frozen=True)
class ArMember:
    """One member of the ar archive: its name and where its bytes are in the file."""

    name: str
    offset: int
    size: int


def ar_members(fd: int, shown: str) -> list[ArMember]:
    """The members of the ar archive open at `fd`, each header validated.

    Raises DebError for anything but a well-formed archive: wrong magic, a header cut short,
    a size that is not plain ASCII decimal digits, or a member running past the end of file.
    """
    size = os.fstat(fd).st_size
    if os.pread(fd, len(AR_MAGIC), 0) != AR_MAGIC:
        raise DebError(f"{shown} is not a .deb (no ar archive signature)")
    members: list[ArMember] = []
    offset = len(AR_MAGIC)
    while offset < size:
        member = _ar_header(os.pread(fd, AR_HEADER, offset), offset, size, shown)
        members.append(member)
        if len(members) > MAX_AR_MEMBERS:
            raise DebError(f"{shown}: more than {MAX_AR_MEMBERS} ar members; not a .deb")
        offset = member.offset + member.size + (member.size & 1)
    return members


def _ar_header(header: bytes, offset: int, file_size: int, shown: str) -> ArMember:
    where = f"{shown}: ar header at byte {offset}"
    if len(header) < AR_HEADER:
        raise DebError(f"{where} is cut short ({len(header)} of {AR_HEADER} bytes): truncated")
    if header[58:60] != b"`\n":
        raise DebError(f"{where} is corrupt (bad end marker)")
    field = header[48:58].rstrip(b" ")
    if not field or not field.isdigit():  # bytes.isdigit: ASCII 0-9 only; no sign, no space
        raise DebError(f"{where} has a bad size field {field.decode('latin-1')!r}")
    size = int(field)
    start = offset + AR_HEADER
    if start + size > file_size:
        raise DebError(
            f"{where}: member of {size} bytes runs past the end of the file "
            f"({file_size} bytes): truncated"
        )
    name = header[:16].decode("latin-1").rstrip(" ").removesuffix("/")
    return ArMember(name, start, size)


def find_member(members: list[ArMember], stem: str, shown: str) -> ArMember:
    """The single member whose name is `stem` or `stem.<compression>`."""
    found = [m for m in members if m.name == stem or m.name.startswith(stem + ".")]
    if len(found) != 1:
        problem = "no" if not found else "more than one"
        raise DebError(f"{shown} has {problem} {stem} member; not a usable .deb")
    return found[0]


# ---------------------------------------------------------------- tarballs inside


@contextlib.contextmanager
def open_tar(fd: int, member: ArMember, shown: str, limit: int) -> Iterator[tarfile.TarFile]:
    """A streaming TarFile over `member`, decompressed by its suffix, output capped at `limit`.

    Errors raised while iterating or reading should be passed through `guard`.
    """
    raw = typing_io(io.BufferedReader(_Window(fd, member.offset, member.size), CHUNK))
    opener = _DECOMPRESSORS.get(member.name.partition(".tar")[2].removeprefix("."))
    if opener is None:
        allowed = ", ".join(sorted(k or "none" for k in _DECOMPRESSORS))
        raise DebError(f"{shown}: unsupported compression of {member.name} (allowed: {allowed})")
    where = f"{shown}: {member.name}"
    capped = _Capped(opener(raw), limit, where)
    with guard(where):
        stream = typing_io(io.BufferedReader(capped, CHUNK))
        tar = tarfile.open(fileobj=stream, mode="r|")  # noqa: SIM115 - closed below
    try:
        yield tar
    finally:
        tar.close()


def data_limit(member: ArMember) -> int:
    """How much a data.tar of this compressed size may decompress to before it is a bomb."""
    return min(MAX_DATA_BYTES, max(BOMB_FLOOR, BOMB_RATIO * member.size))


_DECOMPRESSORS: dict[str, Callable[[IO[bytes]], IO[bytes]]] = {
    "xz": lambda raw: typing_io(lzma.LZMAFile(raw)),  # noqa: SIM115 - closed with the tar
    "gz": lambda raw: typing_io(gzip.GzipFile(fileobj=raw, mode="rb")),
    "bz2": lambda raw: typing_io(bz2.BZ2File(raw)),
    "zst": lambda raw: typing_io(_Zstd(raw)),  # Ubuntu's .debs
    "": lambda raw: raw,
}


def typing_io(stream: object) -> IO[bytes]:
    """The stream as IO[bytes] (the io classes are binary streams; typeshed types them apart)."""
    return stream  # type: ignore[return-value]


@contextlib.contextmanager
def guard(where: str) -> Iterator[None]:
    """Turn whatever a corrupt archive makes tarfile or a decompressor raise into a DebError."""
    try:
        yield
    except DebError:
        raise
    except tarfile.FilterError as exc:
        raise DebError(f"{where}: refused member: {exc}") from None
    except CORRUPT as exc:
        raise DebError(f"{where} is corrupt or truncated: {_why(exc)}") from None


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return {"": "unexpected end of data"}.get(text, text)


def checked_members(tar: tarfile.TarFile, where: str) -> Iterator[tarfile.TarInfo]:
    """Every member of `tar`, each passed through tarfile's `data_filter` (DebError if refused).

    The filter refuses absolute or `..` paths leaving the tree, links (hard or symbolic)
    pointing outside it or to absolute paths, and device or other special files.
    """
    while True:
        with guard(where):
            member = tar.next()
            if member is None:
                return
            tarfile.data_filter(member, _FILTER_ROOT)
        yield member


def member_stream(tar: tarfile.TarFile, member: tarfile.TarInfo, where: str) -> IO[bytes]:
    """The bytes of regular-file `member`, read through `guard` (errors become DebError)."""
    if member.size > MAX_MEMBER_BYTES:
        raise DebError(
            f"{where}: {member.name} is {member.size} bytes, more than the "
            f"{MAX_MEMBER_BYTES >> 20} MiB an emulator may be"
        )
    with guard(where):
        stream = tar.extractfile(member)
    if stream is None:
        raise DebError(f"{where}: {member.name} has no file data")
    return typing_io(io.BufferedReader(_Guarded(stream, where), CHUNK))


def control_files(fd: int, members: list[ArMember], shown: str) -> dict[str, bytes]:
    """The `control` and `md5sums` files of the package's control.tar (md5sums may be absent)."""
    member = find_member(members, "control.tar", shown)
    where = f"{shown}: {member.name}"
    found: dict[str, bytes] = {}
    with open_tar(fd, member, shown, BOMB_FLOOR) as tar:
        for info in checked_members(tar, where):
            name = info.name.removeprefix("./")
            if name not in ("control", "md5sums") or not info.isreg():
                continue
            if info.size > MAX_CONTROL_BYTES:
                raise DebError(f"{where}: {name} file of {info.size} bytes is too large")
            with guard(where):
                stream = tar.extractfile(info)
                found[name] = stream.read() if stream is not None else b""
    if "control" not in found:
        raise DebError(f"{where} has no control file")
    return found


def control_fields(fd: int, members: list[ArMember], shown: str) -> dict[str, str]:
    """The fields of the package's `control` file (Package, Version, ...)."""
    return parse_control(control_files(fd, members, shown)["control"].decode("utf-8", "replace"))


def listed_files(fd: int, members: list[ArMember], shown: str) -> list[str]:
    """The regular files the package lists in md5sums (paths without a leading /)."""
    text = control_files(fd, members, shown).get("md5sums", b"").decode("utf-8", "replace")
    return [line.split(None, 1)[1] for line in text.splitlines() if len(line.split(None, 1)) == 2]


def parse_control(text: str) -> dict[str, str]:
    """RFC 822-style `Key: value` fields; continuation lines are folded into the value."""
    fields: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if line[:1] in (" ", "\t") and key:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip()
            fields[key] = value.strip()
    return fields


# ---------------------------------------------------------------- stream plumbing


class _Window(io.RawIOBase):
    """A read-only view of `size` bytes of `fd` from `start` (pread: no shared offset)."""

    def __init__(self, fd: int, start: int, size: int) -> None:
        self.fd, self.pos, self.left = fd, start, size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = os.pread(self.fd, min(len(buffer), self.left), self.pos)
        buffer[: len(data)] = data
        self.pos += len(data)
        self.left -= len(data)
        return len(data)


class _Capped(io.RawIOBase):
    """Decompressed output that raises DebError once more than `limit` bytes came out."""

    def __init__(self, inner: IO[bytes], limit: int, where: str) -> None:
        self.inner, self.left, self.limit, self.where = inner, limit, limit, where

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        with guard(self.where):
            data = self.inner.read(len(buffer))
        if len(data) > self.left:
            raise DebError(
                f"{self.where} decompresses to more than {self.limit >> 20} MiB "
                "(a decompression bomb, or not a package)"
            )
        self.left -= len(data)
        buffer[: len(data)] = data
        return len(data)


class _Guarded(io.RawIOBase):
    """A member's stream whose read errors (truncation, corrupt blocks) become DebError."""

    def __init__(self, inner: IO[bytes], where: str) -> None:
        self.inner, self.where = inner, where

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        with guard(self.where):
            data = self.inner.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _Zstd(io.RawIOBase):
    """zstd decompression (the zstandard module, imported on first use: only Ubuntu's .debs
    need it) whose errors are ValueErrors like the stdlib decompressors'."""

    def __init__(self, raw: IO[bytes]) -> None:
        try:
            import zstandard
        except ImportError:
            raise DebError(
                "reading a zstd-compressed .deb needs the zstandard module (pip install zstandard)"
            ) from None
        self.error = zstandard.ZstdError
        self.inner = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        try:
            data = self.inner.read(len(buffer))
        except self.error as exc:
            raise ValueError(f"zstd: {exc}") from None
        buffer[: len(data)] = data
        return len(data)
