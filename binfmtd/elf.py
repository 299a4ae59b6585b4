"""ELF header checks for emulator binaries. Pure: works on bytes."""

from __future__ import annotations

import struct
from dataclasses import dataclass

PT_INTERP = 3
ET_EXEC, ET_DYN = 2, 3
HEADER_READ = 64


class ElfError(ValueError):
    """A file that is not a usable static emulator, with the reason."""


@dataclass(frozen=True)
class ElfInfo:
    """The parts of an ELF header binfmtd cares about."""

    elf_class: int
    little_endian: bool
    machine: int
    e_type: int
    phoff: int
    phentsize: int
    phnum: int

    @property
    def phdr_end(self) -> int:
        """Where the program header table ends in the file."""
        return self.phoff + self.phentsize * self.phnum


def parse_header(head: bytes) -> ElfInfo:
    """Parse the ELF header at the start of `head`."""
    if len(head) < 52 or head[:4] != b"\x7fELF":
        raise ElfError("not an ELF file")
    cls, data = head[4], head[5]
    if cls not in (1, 2) or data not in (1, 2):
        raise ElfError(f"bad ELF class/data bytes {cls}/{data}")
    order = "<" if data == 1 else ">"
    e_type, machine = struct.unpack_from(order + "HH", head, 16)
    if cls == 2:
        if len(head) < 64:
            raise ElfError("truncated ELF header")
        (phoff,) = struct.unpack_from(order + "Q", head, 32)
        phentsize, phnum = struct.unpack_from(order + "HH", head, 54)
    else:
        (phoff,) = struct.unpack_from(order + "I", head, 28)
        phentsize, phnum = struct.unpack_from(order + "HH", head, 42)
    if phnum == 0 or phentsize < (56 if cls == 2 else 32):
        raise ElfError("ELF file has no usable program headers")
    return ElfInfo(cls, data == 1, machine, e_type, phoff, phentsize, phnum)


def segments(info: ElfInfo, table: bytes) -> list[tuple[int, int, int]]:
    """(p_type, p_offset, p_filesz) of every program header in `table` (the bytes at phoff)."""
    order = "<" if info.little_endian else ">"
    fmt = order + ("IIQQQQ" if info.elf_class == 2 else "IIIIII")
    out = []
    for i in range(info.phnum):
        fields = struct.unpack_from(fmt, table, i * info.phentsize)
        if info.elf_class == 2:
            out.append((fields[0], fields[2], fields[5]))
        else:
            out.append((fields[0], fields[1], fields[4]))
    return out


def check_static_emulator(
    head: bytes, table: bytes, size: int, host_machine: int | None
) -> ElfInfo:
    """Refuse anything but a complete, static executable for the host's machine."""
    info = parse_header(head)
    if info.e_type not in (ET_EXEC, ET_DYN):
        raise ElfError(f"ELF type {info.e_type} is not an executable")
    if host_machine is not None and info.machine != host_machine:
        raise ElfError(f"built for ELF machine {info.machine}, but this host needs {host_machine}")
    if info.phdr_end > size or len(table) < info.phentsize * info.phnum:
        raise ElfError(f"truncated: program headers end at {info.phdr_end}, file has {size} bytes")
    segs = segments(info, table)
    if any(kind == PT_INTERP for kind, _, _ in segs):
        raise ElfError(
            "dynamically linked (has PT_INTERP); binfmtd needs a static QEMU (Debian 13: "
            "qemu-user; Debian 12 and Ubuntu: qemu-user-static; Fedora: qemu-user-static)"
        )
    end = max(offset + filesz for _, offset, filesz in segs)
    if end > size:
        raise ElfError(f"truncated: segments end at byte {end}, file has {size} bytes")
    return info
