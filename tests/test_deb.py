"""Malformed .debs: each is a clear per-source InstallError, never another exception or a hang.

The packages are built here byte by byte (ar + tar + compression) from a valid baseline, and
broken in one way each; the real Debian .deb is truncated for the truncation cases.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zstandard

from binfmtd import deb
from binfmtd.config import SourceConfig, SourceKind
from binfmtd.emulators import InstallError
from binfmtd.sources import Found, Source

PAYLOAD = b"\x7fELF pretend emulator bytes\n" * 100
CONTROL = b"Package: qemu-user-static\nVersion: 1:9.9-1\nDescription: test\n multi-line\n"
HANG_GUARD_S = 120  # turns a hang into a failure; not a speed assertion

Member = tuple[tarfile.TarInfo, bytes]


def info(
    name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, link: str = ""
) -> tarfile.TarInfo:
    """A tar header."""
    member = tarfile.TarInfo(name)
    member.size, member.type, member.linkname, member.mode = size, kind, link, 0o755
    return member


def regular(name: str, data: bytes = PAYLOAD) -> Member:
    """A regular file member."""
    return info(name, len(data)), data


def tar(members: list[Member]) -> bytes:
    """An uncompressed tarball of `members`."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for member, data in members:
            archive.addfile(member, io.BytesIO(data) if member.isreg() else None)
    return out.getvalue()


COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "xz": lambda b: lzma.compress(b, preset=0),
    "gz": lambda b: gzip.compress(b, compresslevel=1),
    "bz2": lambda b: bz2.compress(b, 1),
    "zst": lambda b: zstandard.ZstdCompressor(level=1).compress(b),
    "": lambda b: b,
}


def ar(members: list[tuple[str, bytes]], sizes: dict[str, bytes] | None = None) -> bytes:
    """An ar archive; `sizes` overrides a member's 10-byte size field."""
    out = [deb.AR_MAGIC]
    for name, data in members:
        size = (sizes or {}).get(name, str(len(data)).encode())
        header = name.encode().ljust(16) + b"0".ljust(12) + b"0".ljust(6) * 2 + b"100644".ljust(8)
        out += [header + size.ljust(10) + b"`\n", data, b"\n" if len(data) % 2 else b""]
    return b"".join(out)


def package(
    data: list[Member] | bytes,
    data_name: str = "data.tar.xz",
    sizes: dict[str, bytes] | None = None,
) -> bytes:
    """A .deb: debian-binary, control.tar.gz and `data` (members, or raw member bytes)."""
    control = gzip.compress(tar([regular("./control", CONTROL)]))
    raw = (
        data if isinstance(data, bytes) else COMPRESS[data_name.partition(".tar")[2][1:]](tar(data))
    )
    members = [("debian-binary", b"2.0\n"), ("control.tar.gz", control), (data_name, raw)]
    return ar(members, sizes)


GOOD = [
    (info("./usr/", kind=tarfile.DIRTYPE), b""),
    (info("./usr/bin/", kind=tarfile.DIRTYPE), b""),
    regular("./usr/bin/qemu-aarch64-static"),
    regular("./usr/share/doc/qemu/README", b"docs"),
]


def read(path: Path) -> dict[str, bytes]:
    """Every Found's bytes from the .deb at `path` (for aarch64 and s390x)."""
    source = Source(SourceConfig(SourceKind.DEB, str(path)))
    return {
        item.arch: item.stream.read()
        for item in source.streams(["aarch64", "s390x"])
        if isinstance(item, Found)
    }


def refusal(tmp_path: Path, body: bytes) -> str:
    """The InstallError text for a .deb holding `body`; fails on any other outcome or a hang."""
    path = tmp_path / "bad.deb"
    path.write_bytes(body)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(read, path)
        with pytest.raises(InstallError) as caught:
            future.result(timeout=HANG_GUARD_S)
    text = str(caught.value)
    assert str(path) in text, text
    return text


@pytest.mark.parametrize("compression", ["xz", "gz", "bz2", "zst", ""])
def test_baseline_package_is_read(tmp_path: Path, compression: str) -> None:
    """The baseline .deb (each compression) yields the emulator's bytes, package and version."""
    name = "data.tar" + (f".{compression}" if compression else "")
    path = tmp_path / "good.deb"
    path.write_bytes(package(GOOD, name))
    assert read(path) == {"aarch64": PAYLOAD}
    source = Source(SourceConfig(SourceKind.DEB, str(path)))
    found = [i for i in source.streams(["aarch64"]) if isinstance(i, Found)]
    assert (found[0].package, found[0].version) == ("qemu-user-static", "1:9.9-1")


# ---------------------------------------------------------------- the ar layer


@pytest.mark.parametrize(
    ("size", "why"),
    [
        (b"4x", "bad size field '4x'"),
        (b"-60", "bad size field '-60'"),
        (b"", "bad size field ''"),
        (b"+8", "bad size field '+8'"),
        (b"99999999", "runs past the end of the file"),
    ],
    ids=["4x", "minus-60", "empty", "plus", "too-big"],
)
def test_bad_ar_size_is_refused(tmp_path: Path, size: bytes, why: str) -> None:
    """A member size that is not plain decimal, is negative, or overruns the file: refused."""
    assert why in refusal(tmp_path, package(GOOD, sizes={"control.tar.gz": size}))


def test_truncated_real_deb_is_refused(tmp_path: Path, qemu_deb: Path) -> None:
    """Debian's real .deb cut in the middle of data.tar (a copy swapped in mid-download)."""
    with qemu_deb.open("rb") as handle:
        body = handle.read(30 << 20)
    assert "truncated" in refusal(tmp_path, body)


def test_truncated_inside_the_compressed_stream_is_refused(tmp_path: Path) -> None:
    """The ar layer intact but the xz stream cut short: corrupt, not an EOFError."""
    raw = COMPRESS["xz"](tar(GOOD))
    text = refusal(tmp_path, package(raw[: len(raw) // 2]))
    assert "data.tar.xz is corrupt or truncated" in text


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"", "not a .deb"),
        (b"PK\x03\x04 a zip file", "not a .deb"),
        (deb.AR_MAGIC + b"debian-binary   0", "cut short"),
        (ar([("debian-binary", b"2.0\n")]), "no control.tar member"),
        (ar([("debian-binary", b"2.0\n")] * 17), "more than 16 ar members"),
    ],
    ids=["empty", "zip", "short-header", "no-members", "many-members"],
)
def test_not_a_package_is_refused(tmp_path: Path, body: bytes, why: str) -> None:
    """Files that are no .deb at all, or lack its members, say so."""
    assert why in refusal(tmp_path, body)


def test_bad_header_end_marker_is_refused(tmp_path: Path) -> None:
    """An ar header without its end marker is corrupt."""
    body = bytearray(package(GOOD))
    body[8 + 58 : 8 + 60] = b"XX"
    assert "bad end marker" in refusal(tmp_path, bytes(body))


# ---------------------------------------------------------------- compression


@pytest.mark.parametrize(
    ("name", "raw", "why"),
    [
        ("data.tar.xz", gzip.compress(tar(GOOD)), "data.tar.xz is corrupt"),
        ("data.tar.gz", lzma.compress(tar(GOOD)), "data.tar.gz is corrupt"),
        ("data.tar.lz4", tar(GOOD), "unsupported compression of data.tar.lz4"),
        ("data.tar.zst", tar(GOOD), "data.tar.zst is corrupt"),
        ("data.tar.zst", gzip.compress(tar(GOOD)), "data.tar.zst is corrupt"),
        ("data.tar.xz", b"\xfd7zXZ\x00 garbage" * 50, "corrupt"),
        ("data.tar", b"not a tar" * 100, "corrupt"),
    ],
    ids=[
        "gzip-named-xz",
        "xz-named-gz",
        "lz4",
        "raw-named-zst",
        "gz-named-zst",
        "garbage-xz",
        "garbage-tar",
    ],
)
def test_wrong_compression_is_refused(tmp_path: Path, name: str, raw: bytes, why: str) -> None:
    """Compression that does not match the name, or an unknown one: a clear error."""
    assert why in refusal(tmp_path, package(raw, name))


# ---------------------------------------------------------------- the data tarball


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (regular("../../etc/cron.d/evil"), "outside the destination"),
        (info("./usr/bin/qemu-aarch64-static", kind=tarfile.SYMTYPE, link="/etc/shadow"), "abs"),
        (
            info("./usr/bin/qemu-aarch64-static", kind=tarfile.SYMTYPE, link="../../../../etc"),
            "outside the destination",
        ),
        (info("./usr/bin/x", kind=tarfile.LNKTYPE, link="../../../etc/shadow"), "outside"),
        (info("./dev/evil", kind=tarfile.CHRTYPE), "special file"),
    ],
    ids=["dotdot-path", "absolute-symlink", "escaping-symlink", "escaping-hardlink", "device"],
)
def test_traversal_and_links_out_are_refused(
    tmp_path: Path, member: tarfile.TarInfo | tuple[tarfile.TarInfo, bytes], why: str
) -> None:
    """tarfile's data filter refuses the whole package for any member leaving the tree."""
    entry = member if isinstance(member, tuple) else (member, b"")
    text = refusal(tmp_path, package([*GOOD, entry]))
    assert "refused member" in text and why in text.lower(), text


def test_emulator_member_that_is_a_link_is_not_followed(tmp_path: Path) -> None:
    """A link (inside the tree) where the emulator should be is reported, never read."""
    link = info("./usr/bin/qemu-s390x-static", kind=tarfile.SYMTYPE, link="qemu-s390x")
    path = tmp_path / "links.deb"
    path.write_bytes(package([*GOOD, (link, b"")]))
    source = Source(SourceConfig(SourceKind.DEB, str(path)))
    missing = [i for i in source.streams(["s390x"]) if not isinstance(i, Found)]
    assert "usr/bin/qemu-s390x-static -> qemu-s390x" in getattr(missing[0], "reason", "")


def test_member_larger_than_the_cap_is_refused(tmp_path: Path) -> None:
    """An emulator member claiming more than MAX_MEMBER_BYTES is refused before any read."""
    huge = info("./usr/bin/qemu-aarch64-static", deb.MAX_MEMBER_BYTES + 1)
    raw = COMPRESS["xz"](huge.tobuf(tarfile.GNU_FORMAT) + b"\0" * 4096)
    assert "more than the 256 MiB an emulator may be" in refusal(tmp_path, package(raw))


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    """A small data.tar.gz that inflates past its allowance (64 MiB floor) is cut off."""
    zeros = info("./usr/share/zeros", 96 << 20)
    stream = io.BytesIO()
    with gzip.GzipFile(fileobj=stream, mode="wb", compresslevel=9) as packed:
        packed.write(zeros.tobuf(tarfile.GNU_FORMAT))
        block = bytes(1 << 20)
        for _ in range(96):
            packed.write(block)
    assert len(stream.getvalue()) < 1 << 20
    assert "decompresses to more than 64 MiB" in refusal(
        tmp_path, package(stream.getvalue(), "data.tar.gz")
    )


def test_truncated_member_read_is_an_install_error(tmp_path: Path) -> None:
    """A tar whose emulator member is cut short fails while reading it, as an InstallError."""
    member = info("./usr/bin/qemu-aarch64-static", 1 << 20)
    raw = COMPRESS["xz"](member.tobuf(tarfile.GNU_FORMAT) + b"x" * 5000)
    assert "corrupt or truncated" in refusal(tmp_path, package(raw))
