"""binfmt_misc's text formats: register strings we write, entry files we read."""

from __future__ import annotations

import contextlib
import re

import pytest
from daemonutil import SandboxSh
from hypothesis import given
from hypothesis import strategies as st

from binfmtd import arch as archmod
from binfmtd.binfmt import (
    MAX_INTERPRETER_LENGTH,
    Entry,
    FormatError,
    Registration,
    normalize_flags,
    parse_entry,
    parse_register_string,
)

AARCH64 = archmod.BY_NAME["aarch64"]
INTERP = "/var/lib/binfmtd/qemu/qemu-aarch64"

# Captured from Linux 6.18 (cat /proc/sys/fs/binfmt_misc/qemu-aarch64 after binfmtd registered it).
KERNEL_AARCH64 = """enabled
interpreter /var/lib/binfmtd/qemu/qemu-aarch64
flags: POCF
offset 0
magic 7f454c460201010000000000000000000200b700
mask ffffffffffffff00fffffffffffffffffeffffff
"""


def aarch64(flags: str = "FPC", interpreter: str = INTERP) -> Registration:
    """The registration binfmtd makes for aarch64."""
    return Registration(AARCH64.entry_name, AARCH64.magic, AARCH64.mask, interpreter, flags)


def test_register_string_hex_escapes_every_byte() -> None:
    """Every magic and mask byte is written as \\xHH, so no ':' or newline can leak."""
    line = aarch64().register_string()
    name, kind, offset, magic, mask, interp, flags = line.split(":")[1:]
    assert (name, kind, offset, interp, flags) == ("qemu-aarch64", "M", "0", INTERP, "POCF")
    assert re.fullmatch(r"(\\x[0-9a-f]{2}){20}", magic)
    assert re.fullmatch(r"(\\x[0-9a-f]{2}){20}", mask)
    assert line.startswith(":qemu-aarch64:M:0:\\x7f\\x45\\x4c\\x46\\x02\\x01\\x01\\x00")


def test_register_string_escapes_separator_bytes() -> None:
    """Magic bytes that are ':' or '\\n' are escaped like any other byte."""
    reg = Registration("x", b":\n\\", b"\xff\xff\xff", "/bin/x", "F")
    assert reg.register_string() == ":x:M:0:\\x3a\\x0a\\x5c:\\xff\\xff\\xff:/bin/x:F"


@pytest.mark.parametrize(
    ("given_flags", "kernel"),
    [
        ("FPC", "POCF"),
        ("C", "OC"),
        ("CF", "OCF"),
        ("FOP", "POF"),
        ("FF", "F"),
        ("", ""),
        ("POCF", "POCF"),
    ],
)
def test_flags_normalized_to_kernel_order(given_flags: str, kernel: str) -> None:
    """Flags come out in the kernel's order POCF, with O added whenever C is present."""
    assert normalize_flags(given_flags) == kernel
    assert aarch64(given_flags).flags == kernel


def test_unknown_flag_rejected() -> None:
    """A flag letter outside POCF is a FormatError naming it."""
    with pytest.raises(FormatError, match="'X'"):
        normalize_flags("FX")


@pytest.mark.parametrize(
    "name",
    ["../x", "a/b", "a:b", "a\nb", ".", "..", "register", "status", "", "x" * 65, ".hidden"],
)
def test_bad_entry_names_rejected(name: str) -> None:
    """Names that would escape the directory, break the line or hit control files are refused."""
    with pytest.raises(FormatError, match="entry name"):
        Registration(name, b"\x7f", b"\xff", "/bin/x", "F")


@pytest.mark.parametrize(
    ("interpreter", "why"),
    [
        ("qemu-aarch64", "absolute"),
        ("./qemu", "absolute"),
        ("/opt/a:b", "':'"),
        ("/opt/a\nb", "control characters"),
        ("/opt/a\x00b", "control characters"),
        ("/opt/a\x1cb", "control characters"),
        ("/opt/\\x41", "':'"),
        ("/" + "q" * MAX_INTERPRETER_LENGTH, "at most 127"),
    ],
)
def test_bad_interpreters_rejected(interpreter: str, why: str) -> None:
    """Relative, separator-carrying or over-long (>127 bytes) interpreters are refused."""
    with pytest.raises(FormatError, match=why):
        aarch64(interpreter=interpreter)


def test_interpreter_of_exactly_127_bytes_accepted() -> None:
    """The kernel's limit itself is allowed."""
    path = "/" + "q" * (MAX_INTERPRETER_LENGTH - 1)
    assert aarch64(interpreter=path).interpreter == path


def test_magic_and_mask_must_agree_in_length() -> None:
    """A mask shorter than the magic, or an empty magic, is refused."""
    with pytest.raises(FormatError, match="differ in length"):
        Registration("x", b"\x7fE", b"\xff", "/bin/x", "F")
    with pytest.raises(FormatError, match="magic must be"):
        Registration("x", b"", b"", "/bin/x", "F")


names = st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9_.+-]{0,20}\Z").filter(
    lambda n: n not in {"register", "status"}
)
paths = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters=":\\"),
    min_size=1,
    max_size=100,
).map(lambda p: "/" + p)


@st.composite
def registrations(draw: st.DrawFn) -> Registration:
    """Any valid registration."""
    magic = draw(st.binary(min_size=1, max_size=128))
    mask = draw(st.binary(min_size=len(magic), max_size=len(magic)))
    flags = "".join(draw(st.lists(st.sampled_from("POCF"), max_size=4)))
    return Registration(draw(names), magic, mask, draw(paths), flags)


@given(registrations())
def test_register_string_round_trips(reg: Registration) -> None:
    """parse_register_string inverts register_string for every valid registration."""
    assert parse_register_string(reg.register_string()) == reg


@given(st.text(max_size=300))
def test_parse_register_string_random_text_only_format_error(text: str) -> None:
    """Arbitrary text either parses or raises FormatError, nothing else."""
    with contextlib.suppress(FormatError):
        parse_register_string(text)


def test_parse_entry_of_captured_kernel_text() -> None:
    """The text Linux prints for a binfmtd entry parses back to that exact registration."""
    entry = parse_entry("qemu-aarch64", KERNEL_AARCH64)
    assert entry.enabled and entry.offset == 0 and entry.extension is None
    assert (entry.interpreter, entry.flags) == (INTERP, "POCF")
    assert entry.matches(aarch64())
    assert not entry.matches(aarch64("F"))
    assert not entry.matches(aarch64(interpreter="/other/qemu-aarch64"))


def test_parse_entry_of_live_kernel_text(sandbox_sh: SandboxSh) -> None:
    """The kernel accepts our register string, and what it prints back parses to the same entry."""
    ours = aarch64(interpreter="/bin/true")
    result = sandbox_sh(
        r"""cd /proc/sys/fs/binfmt_misc
        echo ':mg:M:2:\x41\x42:\xff\xfe:/bin/true:POC' > register
        echo 0 > mg
        echo ':ext:E::bar::/bin/true:' > register
        printf '%s' "$LINE" > register
        for name in mg ext qemu-aarch64; do cat "$name"; echo '==='; done""",
        env={"LINE": ours.register_string()},
    )
    assert result.returncode == 0, result.stderr
    mg, ext, qemu = result.stdout.split("===\n")[:3]
    assert parse_entry("mg", mg) == Entry("mg", False, "/bin/true", "POC", 2, b"AB", b"\xff\xfe")
    assert parse_entry("ext", ext) == Entry("ext", True, "/bin/true", "", extension=".bar")
    assert parse_entry("qemu-aarch64", qemu).matches(ours)
    assert qemu == KERNEL_AARCH64.replace(INTERP, "/bin/true")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "maybe\ninterpreter /x\n",
        "enabled\n",
        "enabled\ninterpreter /x\nflags: Z\n",
        "enabled\ninterpreter /x\noffset two\n",
        "enabled\ninterpreter /x\nmagic 7g\n",
    ],
)
def test_parse_entry_malformed_raises_format_error(text: str) -> None:
    """Unexpected entry text is a FormatError naming the entry."""
    with pytest.raises(FormatError, match=r"^weird: "):
        parse_entry("weird", text)


@given(st.text(max_size=400))
def test_parse_entry_random_text_only_format_error(text: str) -> None:
    """Arbitrary text either parses or raises FormatError, nothing else."""
    with contextlib.suppress(FormatError):
        parse_entry("fuzz", text)


@given(
    st.lists(
        st.sampled_from(
            ["enabled", "disabled", "interpreter /q", "flags: F", "offset 0", "magic 7f", "mask ff"]
        )
        | st.text(max_size=20),
        max_size=8,
    )
)
def test_parse_entry_random_kernel_like_lines_only_format_error(lines: list[str]) -> None:
    """Shuffled kernel-like lines either parse or raise FormatError, nothing else."""
    with contextlib.suppress(FormatError):
        parse_entry("fuzz", "\n".join(lines))


def test_entry_claims_follows_mask() -> None:
    """An entry claims a header whose masked bytes equal its magic, honouring its offset."""
    entry = parse_entry("qemu-aarch64", KERNEL_AARCH64)
    assert entry.claims(AARCH64.magic, AARCH64.mask)
    assert not entry.claims(archmod.BY_NAME["s390x"].magic, archmod.BY_NAME["s390x"].mask)
    shifted = Entry("mg", True, "/bin/true", "", 2, b"AB", b"\xff\xff")
    assert shifted.claims(b"xxAB", b"") and not shifted.claims(b"AB", b"")
