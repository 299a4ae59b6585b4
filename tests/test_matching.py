"""Which entry handles a file (issue 14's fast path): the integer matcher and the per-observation
memo give exactly the kernel's answer (fs/binfmt_misc.c check_file, byte by byte)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from binfmtd import arch as archmod
from binfmtd.binfmt import Entry, Registration
from binfmtd.truth import Observation, first_handler


def kernel_handles(entry: Entry, header: bytes, filename: str) -> bool:
    """The kernel's check, byte by byte (the reference the fast path must equal)."""
    if not entry.enabled:
        return False
    if entry.extension is not None:
        _, dot, ext = filename.rpartition(".")
        return bool(dot) and ext == entry.extension.removeprefix(".")
    if not entry.magic:
        return False
    size = len(entry.magic)
    window = header[entry.offset : entry.offset + size].ljust(size, b"\0")
    mask = entry.mask or b"\xff" * size
    return all((h ^ m) & k == 0 for h, m, k in zip(window, entry.magic, mask, strict=True))


def reference_handler(obs: Observation, header: bytes, filename: str) -> Entry | None:
    """The first enabled entry that catches `header`, without any memo."""
    if not obs.enabled:
        return None
    return next((e for e in obs.entries if kernel_handles(e, header, filename)), None)


@st.composite
def entries(draw: st.DrawFn, name: str = "e") -> Entry:
    """An entry as the kernel may show it: magic (with or without mask), or an extension."""
    if draw(st.integers(0, 9)) == 0:
        ext = draw(st.sampled_from(["sh", ".sh", "py", "bin"]))
        return Entry(name, draw(st.booleans()), "/i", "F", extension=ext)
    magic = draw(st.binary(min_size=1, max_size=24))
    mask = draw(st.one_of(st.just(b""), st.binary(min_size=len(magic), max_size=len(magic))))
    offset = draw(st.integers(0, 8))
    return Entry(name, draw(st.booleans()), "/i", "F", offset, magic, mask)


def near(entry: Entry, noise: bytes) -> bytes:
    """A header close to `entry`'s magic (so matches are common), with `noise` XORed in."""
    base = b"\0" * entry.offset + entry.magic + b"\x01" * 8
    return bytes(b ^ n for b, n in zip(base, noise.ljust(len(base), b"\0"), strict=False))


@given(entries(), st.binary(max_size=40), st.sampled_from(["probe", "x.sh", "a.py"]))
def test_fast_match_equals_the_kernels_byte_by_byte_check(
    entry: Entry, header: bytes, filename: str
) -> None:
    """`Entry.handles` (one integer XOR/AND) answers exactly as the byte-by-byte check."""
    assert entry.handles(header, filename) == kernel_handles(entry, header, filename)


@given(entries(), st.binary(max_size=8), st.integers(0, 40))
def test_fast_match_equals_the_kernel_on_near_and_short_headers(
    entry: Entry, noise: bytes, cut: int
) -> None:
    """Headers equal to the magic but for a few bits, or cut short (read as zeros), agree too."""
    header = near(entry, noise)[:cut]
    assert entry.handles(header) == kernel_handles(entry, header, "probe")


@given(
    st.lists(entries(), max_size=8),
    st.booleans(),
    st.lists(st.binary(max_size=32), min_size=1, max_size=6),
)
def test_memoized_handler_equals_the_unmemoized_one(
    found: list[Entry], enabled: bool, headers: list[bytes]
) -> None:
    """`Observation.handler` (memoized per header) is the first catcher, asked once or again."""
    obs = Observation(enabled, tuple(Entry(f"e{i}", *_fields(e)) for i, e in enumerate(found)))
    probes = headers + [near(e, b"") for e in obs.entries if e.magic]
    for _ in range(2):
        for header in probes:
            for filename in ("probe", "run.sh"):
                want = reference_handler(obs, header, filename)
                assert obs.handler(header, filename) == want
                if obs.enabled:
                    assert first_handler(obs.entries, header, filename) == want


def test_memo_is_not_part_of_an_observations_identity() -> None:
    """Two reads of the same instance are equal whether or not one was already asked."""
    entry = Entry("qemu-aarch64", True, "/q", "F", 0, b"\x7fELF", b"\xff\xff\xff\xff")
    asked, fresh = Observation(True, (entry,)), Observation(True, (entry,))
    assert asked.handler(b"\x7fELF\x02") == entry
    assert asked == fresh and hash(asked) == hash(fresh)


@given(st.sampled_from(sorted(archmod.BY_NAME)))
def test_catalog_entries_match_their_registration_as_the_kernel_stores_it(arch: str) -> None:
    """`Entry.matches` compares with the magic masked, as the kernel stores it."""
    row = archmod.BY_NAME[arch]
    reg = Registration(row.entry_name, row.magic, row.mask, "/q", "F")
    stored = bytes(m & k for m, k in zip(row.magic, row.mask, strict=True))
    assert reg.masked_magic == stored
    entry = Entry(row.entry_name, True, "/q", "F", 0, stored, row.mask)
    assert entry.matches(reg)
    assert entry.handles(row.magic)


def _fields(e: Entry) -> tuple[bool, str, str, int, bytes, bytes, str | None]:
    return (e.enabled, e.interpreter, e.flags, e.offset, e.magic, e.mask, e.extension)
