"""The architecture catalog: one row per QEMU linux-user target, magic/mask derived from ELF.

Pure: no I/O. The binfmt_misc magic/mask are computed from the ELF identification fields of each
row (class, byte order, e_machine, and the few per-target quirks), never pasted as strings.
`tests/test_arch.py` checks every derived pair against Debian's `/usr/lib/binfmt.d/qemu-*.conf`.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import IntEnum, StrEnum


class ElfClass(IntEnum):
    """EI_CLASS."""

    ELF32 = 1
    ELF64 = 2


class ByteOrder(StrEnum):
    """EI_DATA, as the byte order of the target."""

    LITTLE = "little"
    BIG = "big"

    @property
    def ei_data(self) -> int:
        """The EI_DATA byte for this order."""
        return 1 if self is ByteOrder.LITTLE else 2

    @property
    def struct_prefix(self) -> str:
        """The `struct` byte-order prefix."""
        return "<" if self is ByteOrder.LITTLE else ">"


# e_flags sits after e_entry/e_phoff/e_shoff, so its offset moves with the class.
E_FLAGS_OFFSET = {ElfClass.ELF32: 36, ElfClass.ELF64: 48}
EF_MIPS_ABI2 = 0x20  # n32 ABI marker in e_flags


@dataclass(frozen=True)
class Arch:
    """One emulation target: the QEMU name, its ELF identity and the OCI platforms it serves.

    The quirk fields reproduce choices the QEMU project made in `scripts/qemu-binfmt-conf.sh`
    (which Debian ships verbatim), so registrations interoperate with entries other tools make:
    `osabi_mask` 0xfc lets OSABI 0..3 (SYSV, HP-UX, NetBSD, GNU/Linux) through on some targets;
    `abiversion_mask` 0xfe lets MIPS binaries with EI_ABIVERSION 1 through; `machine_mask`
    0x00ff checks only the low byte of e_machine (ppc64le, as upstream does).
    """

    name: str
    elf_class: ElfClass
    order: ByteOrder
    machine: int
    platforms: tuple[str, ...] = ()
    osabi_mask: int = 0x00
    abiversion_mask: int = 0xFF
    machine_mask: int = 0xFFFF
    eflags_mask: int = 0
    eflags_value: int = 0

    @property
    def entry_name(self) -> str:
        """The binfmt_misc entry name, the one the ecosystem uses."""
        return f"qemu-{self.name}"

    @property
    def interpreter_name(self) -> str:
        """The file name of the static emulator in Debian's qemu-user-static."""
        return f"qemu-{self.name}-static"

    @property
    def magic(self) -> bytes:
        """The bytes binfmt_misc compares at offset 0 (already masked)."""
        return bytes(m & k for m, k in zip(self._raw_magic(), self.mask, strict=True))

    @property
    def mask(self) -> bytes:
        """The mask applied to the file's first bytes before comparing with `magic`."""
        head = bytes([0xFF] * 7 + [self.osabi_mask, self.abiversion_mask] + [0xFF] * 7)
        pack = self.order.struct_prefix + "HH"
        return (
            head
            + struct.pack(pack, 0xFFFE, self.machine_mask)
            + self._eflags_bytes(self.eflags_mask)
        )

    def _raw_magic(self) -> bytes:
        ident = b"\x7fELF" + bytes([self.elf_class, self.order.ei_data, 1]) + bytes(9)
        pack = self.order.struct_prefix + "HH"
        return ident + struct.pack(pack, 2, self.machine) + self._eflags_bytes(self.eflags_value)

    def _eflags_bytes(self, word: int) -> bytes:
        """The e_flags word placed at its offset, cut after the last byte the mask checks."""
        if not self.eflags_mask:
            return b""
        start = E_FLAGS_OFFSET[self.elf_class]
        packed = struct.pack(self.order.struct_prefix + "I", word)
        mask_bytes = struct.pack(self.order.struct_prefix + "I", self.eflags_mask)
        last = max(i for i, b in enumerate(mask_bytes) if b)
        return bytes(start - 20) + packed[: last + 1]


def _row(
    name: str, cls: ElfClass, order: ByteOrder, machine: int, *platforms: str, **quirks: int
) -> Arch:
    return Arch(name, cls, order, machine, tuple(platforms), **quirks)


E32, E64, LE, BE = ElfClass.ELF32, ElfClass.ELF64, ByteOrder.LITTLE, ByteOrder.BIG
_MIPS_O32 = {"abiversion_mask": 0xFE, "eflags_mask": EF_MIPS_ABI2, "eflags_value": 0}
_MIPS_N32 = {"abiversion_mask": 0xFE, "eflags_mask": EF_MIPS_ABI2, "eflags_value": EF_MIPS_ABI2}
_ANY_OSABI = {"osabi_mask": 0xFC}

CATALOG: tuple[Arch, ...] = (
    _row("aarch64", E64, LE, 183, "linux/arm64"),
    _row("aarch64_be", E64, BE, 183),
    _row("alpha", E64, LE, 0x9026),
    _row("arm", E32, LE, 40, "linux/arm/v7", "linux/arm/v6", "linux/arm/v5"),
    _row("armeb", E32, BE, 40),
    _row("cris", E32, LE, 76),
    _row("hexagon", E32, LE, 164),
    _row("hppa", E32, BE, 15),
    _row("i386", E32, LE, 3, "linux/386"),
    _row("loongarch64", E64, LE, 258, "linux/loong64", osabi_mask=0xFC, abiversion_mask=0x00),
    _row("m68k", E32, BE, 4),
    _row("microblaze", E32, BE, 0xBAAB),
    _row("microblazeel", E32, LE, 0xBAAB),
    _row("mips", E32, BE, 8, "linux/mips", **_MIPS_O32),
    _row("mips64", E64, BE, 8, "linux/mips64", abiversion_mask=0xFE),
    _row("mips64el", E64, LE, 8, "linux/mips64le", abiversion_mask=0xFE),
    _row("mipsel", E32, LE, 8, "linux/mipsle", **_MIPS_O32),
    _row("mipsn32", E32, BE, 8, **_MIPS_N32),
    _row("mipsn32el", E32, LE, 8, **_MIPS_N32),
    _row("nios2", E32, LE, 113),
    _row("or1k", E32, BE, 92),
    _row("ppc", E32, BE, 20, **_ANY_OSABI),
    _row("ppc64", E64, BE, 21, "linux/ppc64", **_ANY_OSABI),
    _row("ppc64le", E64, LE, 21, "linux/ppc64le", osabi_mask=0xFC, machine_mask=0x00FF),
    _row("riscv32", E32, LE, 243),
    _row("riscv64", E64, LE, 243, "linux/riscv64"),
    _row("s390x", E64, BE, 22, "linux/s390x", **_ANY_OSABI),
    _row("sh4", E32, LE, 42, **_ANY_OSABI),
    _row("sh4eb", E32, BE, 42, **_ANY_OSABI),
    _row("sparc", E32, BE, 2, **_ANY_OSABI),
    _row("sparc32plus", E32, BE, 18, **_ANY_OSABI),
    _row("sparc64", E64, BE, 43, **_ANY_OSABI),
    _row("x86_64", E64, LE, 62, "linux/amd64"),
    _row("xtensa", E32, LE, 94),
    _row("xtensaeb", E32, BE, 94),
)

BY_NAME: dict[str, Arch] = {a.name: a for a in CATALOG}

# Which catalog targets a host runs without emulation, by `uname -m`: (always, compat). The
# compat set holds the 32-bit (or other-ABI) targets the kernel may also run; each is proven by
# running its probe, never assumed. Where `uname -m` does not say the byte order (mips64, ppc64,
# armv8l on a big-endian system...), a pair (little, big) is given and the order of the running
# binary picks one.
_Pair = tuple[tuple[str, ...], tuple[str, ...]]
_NATIVE: dict[str, _Pair | tuple[_Pair, _Pair]] = {
    "x86_64": (("x86_64",), ("i386",)),
    "amd64": (("x86_64",), ("i386",)),
    "aarch64": ((("aarch64",), ("arm",)), (("aarch64_be",), ("armeb",))),
    "arm64": (("aarch64",), ("arm",)),
    "aarch64_be": (("aarch64_be",), ("armeb",)),
    "armv8l": (("arm",), ("aarch64",)),  # 32-bit userland on an arm64 kernel (PER_LINUX32)
    "armv8b": (("armeb",), ("aarch64_be",)),
    "arm": ((("arm",), ()), (("armeb",), ())),
    "armeb": (("armeb",), ()),
    "mips64": ((("mips64el",), ("mipsel", "mipsn32el")), (("mips64",), ("mips", "mipsn32"))),
    "mips": ((("mipsel",), ()), (("mips",), ())),
    "ppc64": ((("ppc64le",), ()), (("ppc64",), ("ppc",))),
    "ppc64le": (("ppc64le",), ()),
    "ppc": (("ppc",), ()),
    "s390x": (("s390x",), ()),
    "riscv64": (("riscv64",), ("riscv32",)),
    "riscv32": (("riscv32",), ()),
    "loongarch64": (("loongarch64",), ()),
    "sparc64": (("sparc64",), ("sparc", "sparc32plus")),
    "sparc": (("sparc",), ("sparc32plus",)),
    "alpha": (("alpha",), ()),
    "m68k": (("m68k",), ()),
    "sh4": ((("sh4",), ()), (("sh4eb",), ())),
    "sh4a": ((("sh4",), ()), (("sh4eb",), ())),
    "parisc": (("hppa",), ()),
    "parisc64": ((), ("hppa",)),
    "microblaze": ((("microblazeel",), ()), (("microblaze",), ())),
    "xtensa": ((("xtensa",), ()), (("xtensaeb",), ())),
    "or1k": (("or1k",), ()),
    "nios2": (("nios2",), ()),
    "hexagon": (("hexagon",), ()),
    "cris": (("cris",), ()),
}
_ARM32 = re.compile(r"^armv[4-7][a-z]*$")


def host_arches(machine: str, order: ByteOrder = ByteOrder.LITTLE) -> _Pair:
    """(always native, compat candidates) for `uname -m` == `machine` on a host of `order`.

    `order` is the byte order of the running binary (its ELF EI_DATA). armv4..armv7 end in
    "l" (little) or "b" (big); unknown machines give ((), ()).
    """
    if _ARM32.match(machine):
        return (("armeb",), ()) if machine.endswith("b") else (("arm",), ())
    if machine in {"i386", "i486", "i586", "i686"}:
        return (("i386",), ())
    row = _NATIVE.get(machine)
    if row is None:
        return ((), ())
    if row[0] and isinstance(row[0][0], tuple):  # (little, big)
        pair = row[0] if order is ByteOrder.LITTLE else row[1]
        return pair
    return row


def native_arches(
    machine: str, *, compat32: bool, order: ByteOrder = ByteOrder.LITTLE
) -> tuple[str, ...]:
    """The catalog names a host of `uname -m` == `machine` runs natively."""
    always, compat = host_arches(machine, order)
    return always + (compat if compat32 else ())


def compat_candidates(machine: str, order: ByteOrder = ByteOrder.LITTLE) -> tuple[str, ...]:
    """The 32-bit targets whose nativeness depends on the kernel's compat support."""
    return host_arches(machine, order)[1]


def host_elf_machine(machine: str, order: ByteOrder = ByteOrder.LITTLE) -> int | None:
    """The e_machine a static emulator built for this host must carry."""
    always = host_arches(machine, order)[0]
    return BY_NAME[always[0]].machine if always else None


def arches_of_header(header: bytes) -> tuple[str, ...]:
    """The catalog targets whose magic/mask catch an ELF file starting with `header`.

    binfmtd runs `header` (the start of its own executable) through these to learn what the
    host runs natively, whatever `uname -m` says.
    """
    padded = header.ljust(MAX_HEADER, b"\0")
    return tuple(
        a.name
        for a in CATALOG
        if all((h ^ m) & k == 0 for h, m, k in zip(padded, a.magic, a.mask, strict=False))
    )


def order_of_header(header: bytes) -> ByteOrder:
    """The byte order an ELF header declares (EI_DATA); little when it is not ELF."""
    return (
        ByteOrder.BIG if header[:4] == b"\x7fELF" and header[5:6] == b"\x02" else ByteOrder.LITTLE
    )


MAX_HEADER = 256  # BINPRM_BUF_SIZE: the bytes binfmt_misc compares a file's start against


class UnknownArch(KeyError):
    """A name no catalog row answers to; `message` holds the "did you mean" hint."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = message

    def __str__(self) -> str:
        return self.message


# Names operators already use for a target beyond its QEMU name and OCI platforms: Debian
# architectures (dpkg), `uname -m`, tonistiigi/binfmt's and Go's GOARCH names.
_EXTRA_NAMES: dict[str, str] = {
    "arm64": "aarch64",
    "arm64/v8": "aarch64",
    "armv8": "aarch64",
    "armhf": "arm",
    "armel": "arm",
    "armv7": "arm",
    "armv7l": "arm",
    "armv6": "arm",
    "armv6l": "arm",
    "armv5": "arm",
    "386": "i386",
    "i486": "i386",
    "i586": "i386",
    "i686": "i386",
    "x86": "i386",
    "amd64": "x86_64",
    "x86-64": "x86_64",
    "amd64/v1": "x86_64",
    "amd64/v2": "x86_64",
    "amd64/v3": "x86_64",
    "amd64/v4": "x86_64",
    "ppc64el": "ppc64le",
    "powerpc64le": "ppc64le",
    "powerpc64": "ppc64",
    "powerpc": "ppc",
    "mips64le": "mips64el",
    "mipsle": "mipsel",
    "loong64": "loongarch64",
    "riscv64gc": "riscv64",
    "sparc64v9": "sparc64",
    "s390": "s390x",
}


def _aliases() -> dict[str, str]:
    """Every accepted spelling -> QEMU name: QEMU names, entry names, OCI platforms with and
    without `linux/`, and the extra names above."""
    names: dict[str, str] = {}
    for row in CATALOG:
        names[row.name] = row.name
        names[row.entry_name] = row.name
        for platform in row.platforms:
            names[platform] = row.name
            names[platform.removeprefix("linux/")] = row.name
    for alias, target in _EXTRA_NAMES.items():
        names.setdefault(alias, target)
        names.setdefault(f"linux/{alias}", target)
    return names


ALIASES: dict[str, str] = _aliases()


def resolve(name: str) -> Arch:
    """The catalog row `name` stands for: a QEMU name (`aarch64`), an OCI platform
    (`linux/arm64`, `arm/v7`), a Docker/Go or Debian name (`arm64`, `386`, `armhf`,
    `ppc64el`, `loong64`) or an entry name (`qemu-aarch64`), spelled exactly (lower case).
    Raises `UnknownArch` with the closest known names."""
    target = ALIASES.get(name)
    if target is None:
        raise UnknownArch(name, f"unknown architecture {name!r}{did_you_mean(name)}")
    return BY_NAME[target]


def canonical(name: str) -> str:
    """The QEMU name for any accepted spelling (see `resolve`)."""
    return resolve(name).name


def did_you_mean(name: str) -> str:
    """'; did you mean arm64 (aarch64)?' for the closest accepted names, or a pointer."""
    import difflib  # only for an unknown name: ~1 ms of every start otherwise

    close = difflib.get_close_matches(name.strip().lower(), ALIASES, n=8, cutoff=0.6)
    best: dict[str, str] = {}  # one spelling per target, closest first
    for candidate in close:
        best.setdefault(ALIASES[candidate], candidate)
    if not best:
        return "; see `binfmtctl status` or the catalog in the README for the names"
    shown = [c if t == c else f"{c} ({t})" for t, c in list(best.items())[:3]]
    return f"; did you mean {' or '.join(shown)}?"


def lookup(name: str) -> Arch:
    """The catalog row for `name` (any spelling `resolve` accepts), or `UnknownArch`."""
    return resolve(name)


def platforms_of(names: tuple[str, ...] | list[str]) -> list[str]:
    """The OCI platforms served by these targets, in catalog order, without duplicates."""
    seen: dict[str, None] = {}
    for name in names:
        for platform in BY_NAME[name].platforms if name in BY_NAME else ():
            seen.setdefault(platform)
    return list(seen)
