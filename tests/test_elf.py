"""ELF checks for emulator binaries, on real files: static QEMU in, everything else out."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from binfmtd import elf

X86_64 = 62


def check_bytes(data: bytes, host: int | None = X86_64) -> elf.ElfInfo:
    """Run the emulator check the way the installer does: header, program headers, size."""
    head = data[: elf.HEADER_READ]
    info = elf.parse_header(head)
    table = data[info.phoff : info.phoff + info.phentsize * info.phnum]
    return elf.check_static_emulator(head, table, len(data), host)


def test_real_static_qemu_accepted(qemu_dir: Path) -> None:
    """Debian's static qemu-aarch64 is a complete static x86_64 executable."""
    info = check_bytes((qemu_dir / "qemu-aarch64-static").read_bytes())
    assert (info.elf_class, info.little_endian, info.machine) == (2, True, X86_64)


def test_dynamically_linked_refused() -> None:
    """/bin/ls has PT_INTERP: refused as dynamically linked."""
    ls = Path(shutil.which("ls") or "/bin/ls").read_bytes()
    with pytest.raises(elf.ElfError, match="dynamically linked"):
        check_bytes(ls)


def test_wrong_machine_refused(busybox: Callable[[str], Path]) -> None:
    """A static arm64 binary is refused on an x86_64 host: wrong ELF machine."""
    with pytest.raises(elf.ElfError, match="machine 183, but this host needs 62"):
        check_bytes(busybox("arm64").read_bytes())


def test_host_machine_unknown_skips_the_machine_check(busybox: Callable[[str], Path]) -> None:
    """With no known host machine the check still demands a complete static executable."""
    assert check_bytes(busybox("arm64").read_bytes(), host=None).machine == 183


def test_truncated_refused(qemu_dir: Path) -> None:
    """The first 100 KB of a real QEMU is refused as truncated."""
    data = (qemu_dir / "qemu-aarch64-static").read_bytes()[:100_000]
    with pytest.raises(elf.ElfError, match="truncated"):
        check_bytes(data)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b'#!/bin/sh\nexec qemu-aarch64 "$@"\n' + bytes(64), "not an ELF file"),
        (b"\x7fELF", "not an ELF file"),
        (b"\x7fELF\x03\x01" + bytes(60), "bad ELF class"),
        (b"\x7fELF\x02\x01\x01" + bytes(57), "no usable program headers"),
    ],
)
def test_not_elf_refused(data: bytes, why: str) -> None:
    """Scripts, short files and nonsense headers are refused with the reason."""
    with pytest.raises(elf.ElfError, match=why):
        elf.parse_header(data)


def test_relocatable_object_refused(qemu_dir: Path) -> None:
    """An ELF that is not ET_EXEC/ET_DYN (here patched to ET_REL) is refused."""
    data = bytearray((qemu_dir / "qemu-aarch64-static").read_bytes()[:4096])
    data[16:18] = b"\x01\x00"
    with pytest.raises(elf.ElfError, match="not an executable"):
        check_bytes(bytes(data))


@given(
    st.sampled_from([b"\x01\x01", b"\x01\x02", b"\x02\x01", b"\x02\x02", b"\x00\x01"]),
    st.binary(min_size=0, max_size=200),
    st.binary(max_size=400),
    st.integers(0, 1 << 40),
    st.sampled_from([X86_64, None]),
)
def test_random_bytes_only_raise_elf_error(
    ident: bytes, head: bytes, table: bytes, size: int, host: int | None
) -> None:
    """Whatever the bytes, the check returns ElfInfo or raises ElfError, nothing else."""
    with contextlib.suppress(elf.ElfError):
        elf.check_static_emulator(b"\x7fELF" + ident + head, table, size, host)
