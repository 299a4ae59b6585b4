"""The catalog: derived magic/mask against Debian's binfmt.d, probes, platforms, native table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import Cache

from binfmtd import arch as archmod
from binfmtd.probe import PROBE_DIR

_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")


def decode(field: str) -> bytes:
    """A binfmt.d magic/mask field: \\xHH escapes, every other character stands for itself."""
    out = bytearray()
    pos = 0
    for match in _ESCAPE.finditer(field):
        out += field[pos : match.start()].encode("latin-1")
        out.append(int(match.group(1), 16))
        pos = match.end()
    out += field[pos:].encode("latin-1")
    return bytes(out)


def debian_definitions(binfmt_d: Path) -> dict[str, tuple[bytes, bytes]]:
    """name -> (magic, mask) from Debian's qemu-*.conf (`:name:M::magic:mask:interp:flags`)."""
    found = {}
    for conf in sorted(binfmt_d.glob("qemu-*.conf")):
        line = conf.read_text(encoding="latin-1").strip()
        fields = line.split(line[0])
        assert fields[3] in {"", "0"} and fields[2] == "M", f"{conf}: unexpected line {line!r}"
        found[fields[1].removeprefix("qemu-")] = (decode(fields[4]), decode(fields[5]))
    return found


def masked(data: bytes, mask: bytes) -> bytes:
    """`data` under `mask`, as the kernel compares it."""
    return bytes(d & m for d, m in zip(data, mask, strict=False))


def test_decode_reads_escapes_and_literals() -> None:
    """The oracle's own parser turns \\xHH into bytes and keeps literal characters."""
    assert decode(r"\x7fELF\x02") == b"\x7fELF\x02"


def test_derived_magic_and_mask_equal_debian(cache: Cache) -> None:
    """For every arch Debian and the catalog both know, the mask and the masked magic agree."""
    debian = debian_definitions(cache.binfmt_d)
    common = sorted(set(debian) & set(archmod.BY_NAME))
    assert len(common) >= 25, f"too few arches in common to be a real check: {common}"
    for name in common:
        magic, mask = debian[name]
        row = archmod.BY_NAME[name]
        assert row.mask == mask, f"{name}: mask {row.mask.hex()} != Debian {mask.hex()}"
        assert row.magic == masked(magic, mask), f"{name}: magic differs from Debian's"


def test_debian_knows_no_arch_missing_from_the_catalog(cache: Cache) -> None:
    """Every target Debian registers is in the catalog."""
    assert set(debian_definitions(cache.binfmt_d)) <= set(archmod.BY_NAME)


def test_magic_is_stored_masked_and_as_long_as_mask() -> None:
    """Each row's magic has the mask's length and no bit the mask clears."""
    for row in archmod.CATALOG:
        assert len(row.magic) == len(row.mask), row.name
        assert masked(row.magic, row.mask) == row.magic, row.name


def test_every_arch_has_a_probe_matching_only_itself() -> None:
    """Each committed probe's header matches its own arch's magic/mask and no other arch's."""
    for row in archmod.CATALOG:
        probe = PROBE_DIR / row.name
        assert probe.is_file(), f"no committed probe for {row.name}"
        head = probe.read_bytes()[:128]
        claimed_by = [
            other.name
            for other in archmod.CATALOG
            if masked(head, other.mask) == other.magic and len(head) >= len(other.mask)
        ]
        assert claimed_by == [row.name], f"probe {row.name} is claimed by {claimed_by}"


def test_catalog_names_are_unique_and_entry_names_follow_the_ecosystem() -> None:
    """Names are unique; entries are qemu-<name>, emulators qemu-<name>-static."""
    names = [row.name for row in archmod.CATALOG]
    assert len(names) == len(set(names)) == 35
    row = archmod.lookup("riscv64")
    assert (row.entry_name, row.interpreter_name) == ("qemu-riscv64", "qemu-riscv64-static")


@pytest.mark.parametrize(
    ("name", "platform"),
    [
        ("x86_64", "linux/amd64"),
        ("i386", "linux/386"),
        ("aarch64", "linux/arm64"),
        ("arm", "linux/arm/v7"),
        ("ppc64le", "linux/ppc64le"),
        ("s390x", "linux/s390x"),
        ("riscv64", "linux/riscv64"),
        ("mips64el", "linux/mips64le"),
        ("mipsel", "linux/mipsle"),
        ("loongarch64", "linux/loong64"),
    ],
)
def test_well_known_oci_platforms(name: str, platform: str) -> None:
    """The well-known targets advertise their OCI platform first."""
    assert archmod.BY_NAME[name].platforms[0] == platform


def test_arm_serves_v7_v6_v5_and_exotic_targets_none() -> None:
    """32-bit arm serves every arm variant; targets without an OCI platform advertise none."""
    assert archmod.BY_NAME["arm"].platforms == ("linux/arm/v7", "linux/arm/v6", "linux/arm/v5")
    assert archmod.BY_NAME["xtensa"].platforms == ()


def test_platforms_of_keeps_catalog_entries_once_and_skips_unknown() -> None:
    """platforms_of concatenates without duplicates and ignores unknown names."""
    got = archmod.platforms_of(["aarch64", "aarch64", "nonesuch", "s390x", "cris"])
    assert got == ["linux/arm64", "linux/s390x"]


@pytest.mark.parametrize(
    ("machine", "compat32", "native"),
    [
        ("x86_64", True, ("x86_64", "i386")),
        ("x86_64", False, ("x86_64",)),
        ("i686", True, ("i386",)),
        ("aarch64", True, ("aarch64", "arm")),
        ("aarch64", False, ("aarch64",)),
        ("armv7l", False, ("arm",)),
        ("ppc64le", True, ("ppc64le",)),
        ("s390x", True, ("s390x",)),
        ("riscv64", False, ("riscv64",)),
        ("sparc64", True, ("sparc64", "sparc", "sparc32plus")),
        ("vax", True, ()),
    ],
)
def test_native_detection_table(machine: str, compat32: bool, native: tuple[str, ...]) -> None:
    """native_arches maps `uname -m` to what the host runs itself, 32-bit only with compat."""
    assert archmod.native_arches(machine, compat32=compat32) == native


@pytest.mark.parametrize(
    ("machine", "order", "always", "compat"),
    [
        ("armv6l", archmod.ByteOrder.LITTLE, ("arm",), ()),
        ("armv5tel", archmod.ByteOrder.LITTLE, ("arm",), ()),
        ("armv7b", archmod.ByteOrder.BIG, ("armeb",), ()),
        ("armv8l", archmod.ByteOrder.LITTLE, ("arm",), ("aarch64",)),
        ("mips64", archmod.ByteOrder.LITTLE, ("mips64el",), ("mipsel", "mipsn32el")),
        ("mips64", archmod.ByteOrder.BIG, ("mips64",), ("mips", "mipsn32")),
        ("ppc64", archmod.ByteOrder.BIG, ("ppc64",), ("ppc",)),
        ("ppc64", archmod.ByteOrder.LITTLE, ("ppc64le",), ()),
        ("aarch64", archmod.ByteOrder.BIG, ("aarch64_be",), ("armeb",)),
        ("i586", archmod.ByteOrder.LITTLE, ("i386",), ()),
        ("parisc64", archmod.ByteOrder.BIG, (), ("hppa",)),
    ],
)
def test_uname_mapping_is_complete_with_byte_order_from_the_binary(
    machine: str, order: archmod.ByteOrder, always: tuple[str, ...], compat: tuple[str, ...]
) -> None:
    """`uname -m` values that used to map to the wrong arch or none (issue 10, 4d)."""
    assert archmod.host_arches(machine, order) == (always, compat)


@pytest.mark.parametrize(
    "arch", ["x86_64", "i386", "aarch64", "arm", "mips64el", "ppc64", "mipsn32"]
)
def test_own_header_names_its_arch_and_byte_order(arch: str) -> None:
    """The running binary's header is caught by its own catalog row (and no emulated one)."""
    row = archmod.BY_NAME[arch]
    head = row.magic + bytes(64)
    assert arch in archmod.arches_of_header(head)
    assert archmod.order_of_header(head) is row.order


def test_compat_candidates_and_host_machine() -> None:
    """The 32-bit candidates and the ELF machine a host emulator must carry."""
    assert archmod.compat_candidates("x86_64") == ("i386",)
    assert archmod.compat_candidates("s390x") == ()
    assert archmod.host_elf_machine("x86_64") == 62
    assert archmod.host_elf_machine("aarch64") == 183
    assert archmod.host_elf_machine("vax") is None


@pytest.mark.parametrize(
    ("name", "qemu"),
    [
        ("aarch64", "aarch64"),
        ("linux/arm64", "aarch64"),
        ("arm64", "aarch64"),
        ("arm64/v8", "aarch64"),
        ("arm/v7", "arm"),
        ("linux/arm/v6", "arm"),
        ("armhf", "arm"),
        ("amd64", "x86_64"),
        ("386", "i386"),
        ("ppc64le", "ppc64le"),
        ("ppc64el", "ppc64le"),
        ("mips64le", "mips64el"),
        ("linux/mipsle", "mipsel"),
        ("loong64", "loongarch64"),
        ("riscv64", "riscv64"),
        ("s390x", "s390x"),
        ("qemu-aarch64", "aarch64"),
    ],
)
def test_platform_names_resolve(name: str, qemu: str) -> None:
    """QEMU names, Docker/OCI platforms, Debian and tonistiigi/binfmt names all resolve."""
    assert archmod.canonical(name) == qemu


def test_every_platform_and_name_resolves_to_its_row() -> None:
    """Each catalog row answers to its QEMU name, entry name and every OCI platform."""
    for row in archmod.CATALOG:
        for name in (row.name, row.entry_name, *row.platforms):
            assert archmod.resolve(name) is row


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("arn64", "did you mean arm64 (aarch64)"),
        ("aarch46", "aarch64"),
        ("risc64", "riscv64"),
        ("Linux/ARM64", "linux/arm64 (aarch64)"),
    ],
)
def test_unknown_name_says_did_you_mean(name: str, hint: str) -> None:
    """An unknown name gets the closest known names."""
    with pytest.raises(archmod.UnknownArch, match="did you mean") as info:
        archmod.resolve(name)
    assert hint in str(info.value)
    assert f"unknown architecture {name!r}" in str(info.value)


def test_unrelated_name_points_to_the_list() -> None:
    """A name close to nothing still gets a pointer to where the names are."""
    with pytest.raises(KeyError, match="binfmtctl status"):
        archmod.lookup("zzzzzz")
