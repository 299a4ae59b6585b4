"""binfmt_misc's text formats: the register string we write and the entry files we read. Pure."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from enum import StrEnum

# The kernel refuses register strings over this length (fs/binfmt_misc.c MAX_REGISTER_LENGTH).
MAX_REGISTER_LENGTH = 1920
# Kernels before 5.1 copy the interpreter into a 128-byte buffer; we keep to that everywhere.
MAX_INTERPRETER_LENGTH = 127
MAX_MAGIC_LENGTH = 128  # BINPRM_BUF_SIZE on old kernels; offset + size must fit in it
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}$")


class Flag(StrEnum):
    """Registration flags, in the order the kernel prints them."""

    PRESERVE_ARGV0 = "P"
    OPEN_BINARY = "O"
    CREDENTIALS = "C"
    FIX_BINARY = "F"


FLAG_ORDER = "POCF"


def credentials_warning(entry_name: str) -> str:
    """The warning shown (status, CLI, oneshot) while an entry carries the C flag."""
    return (
        f"entry {entry_name} has the C flag: setuid foreign binaries run QEMU as root under the "
        "caller's environment, so a local user can gain root; drop C from `flags` (or from "
        "the tool that registered it) unless every local user is trusted with root"
    )


class FormatError(ValueError):
    """A value that cannot go into, or did not come out of, binfmt_misc as expected."""


def normalize_flags(flags: str) -> str:
    """Flags in kernel order; C implies O, as the kernel itself records it."""
    unknown = set(flags) - set(FLAG_ORDER)
    if unknown:
        raise FormatError(f"unknown binfmt flag(s) {''.join(sorted(unknown))!r}; allowed: POCF")
    wanted = set(flags) | ({"O"} if "C" in flags else set())
    return "".join(f for f in FLAG_ORDER if f in wanted)


@dataclass(frozen=True)
class Registration:
    """What we ask the kernel to register (a magic-type entry at offset 0)."""

    name: str
    magic: bytes
    mask: bytes
    interpreter: str
    flags: str

    def __post_init__(self) -> None:
        validate_name(self.name)
        validate_interpreter(self.interpreter)
        if not self.magic or len(self.magic) > MAX_MAGIC_LENGTH:
            raise FormatError(f"{self.name}: magic must be 1..{MAX_MAGIC_LENGTH} bytes")
        if len(self.mask) != len(self.magic):
            raise FormatError(f"{self.name}: mask and magic differ in length")
        object.__setattr__(self, "flags", normalize_flags(self.flags))

    def register_string(self) -> str:
        """The line written to `register`; every magic/mask byte hex-escaped, so no ':' leaks."""
        return self._line

    @functools.cached_property
    def masked_magic(self) -> bytes:
        """`magic & mask`, as the kernel stores and shows it."""
        size = len(self.magic)
        return (int.from_bytes(self.magic) & int.from_bytes(self.mask)).to_bytes(size)

    @functools.cached_property
    def register_bytes(self) -> bytes:
        """`register_string()` as the bytes written, encoded once."""
        return self._line.encode("latin-1")

    @functools.cached_property
    def _line(self) -> str:
        line = ":".join(
            [
                "",
                self.name,
                "M",
                "0",
                _hex(self.magic),
                _hex(self.mask),
                self.interpreter,
                self.flags,
            ]
        )
        if len(line) > MAX_REGISTER_LENGTH:
            raise FormatError(f"{self.name}: register string is {len(line)} bytes, over the limit")
        return line


def _hex(data: bytes) -> str:
    # bytes.hex does the work in C: this runs for every entry on every registration.
    return "\\x" + data.hex(":").replace(":", "\\x") if data else ""


def validate_name(name: str) -> None:
    """Entry names become file names under binfmt_misc: no '/', no dot-names, no separators."""
    if not NAME_RE.fullmatch(name) or name in {".", ".."} or name in {"register", "status"}:
        raise FormatError(f"invalid binfmt_misc entry name {name!r}")


def control_characters(text: str) -> str:
    """The control characters (C0, DEL, C1) in `text`, each once, in order; "" when none.

    Line-breaking ones (\r, \v, \f, \x1c-\x1e, \x85) split the kernel's entry text for
    Python's `splitlines`, and every one of them makes a path or name unreadable in logs.
    """
    seen = dict.fromkeys(c for c in text if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0)
    return "".join(seen)


def validate_interpreter(path: str) -> None:
    """An absolute path with none of the register string's separators, within the kernel limit."""
    if not path.startswith("/"):
        raise FormatError(f"interpreter {path!r} must be an absolute path")
    if bad := control_characters(path):
        raise FormatError(f"interpreter {path!r} contains control characters {bad!r}")
    if ":" in path or "\\x" in path:
        raise FormatError(f"interpreter {path!r} contains ':' or '\\x'")
    if not path.isascii():
        # binfmt_misc keeps bytes and shows them back raw; ASCII keeps both sides identical.
        raise FormatError(f"interpreter {path!r} is not ASCII: choose an ASCII install directory")
    if len(path.encode()) > MAX_INTERPRETER_LENGTH:
        raise FormatError(
            f"interpreter path is {len(path.encode())} bytes; binfmt_misc takes at most "
            f"{MAX_INTERPRETER_LENGTH}: choose a shorter install directory"
        )


def parse_register_string(line: str) -> Registration:
    """The inverse of `Registration.register_string` for magic entries at offset 0."""
    fields = line.rstrip("\n").split(line[:1] or ":")
    if len(fields) != 8 or fields[0] != "" or fields[2] != "M":
        raise FormatError(f"not a magic register string: {line!r}")
    if fields[3] not in {"", "0"}:
        raise FormatError(f"only offset 0 is supported: {line!r}")
    return Registration(fields[1], _unhex(fields[4]), _unhex(fields[5]), fields[6], fields[7])


def _unhex(text: str) -> bytes:
    out = bytearray()
    i = 0
    while i < len(text):
        if text.startswith("\\x", i) and len(text) >= i + 4:
            try:
                out.append(int(text[i + 2 : i + 4], 16))
            except ValueError:
                raise FormatError(f"bad escape in {text!r}") from None
            i += 4
        else:
            out.append(ord(text[i]) & 0xFF)
            i += 1
    return bytes(out)


@dataclass(frozen=True)
class Entry:
    """An entry as the kernel shows it under binfmt_misc/<name>."""

    name: str
    enabled: bool
    interpreter: str
    flags: str
    offset: int = 0
    magic: bytes = b""
    mask: bytes = b""
    extension: str | None = None
    ident: int = 0  # the entry file's inode: a new one for every registration, so a probe
    # result is tied to this very entry, not to a later one with the same text

    def matches(self, reg: Registration) -> bool:
        """Whether this entry is exactly `reg`, as the kernel stores it (magic masked)."""
        return (
            self.extension is None
            and self.offset == 0
            and self.interpreter == reg.interpreter
            and self.flags == reg.flags
            and self.mask == reg.mask
            and self.magic == reg.masked_magic
        )

    def claims(self, magic: bytes, mask: bytes) -> bool:
        """Whether this entry would catch files whose header is `magic` under `mask`."""
        if self.extension is not None or not self.magic:
            return False
        header = magic[self.offset :]
        if len(header) < len(self.magic):
            return False
        own_mask = self.mask or bytes([0xFF] * len(self.magic))
        return all((h & k) == m for h, k, m in zip(header, own_mask, self.magic, strict=False))

    def spread(self, end: int) -> tuple[int, int]:
        """Magic and mask as integers over the bytes [0, end) of a file (mask 0 elsewhere);
        `end` >= offset + len(magic). Some file's first bytes are caught by the masked magic
        of two entries spread to one `end` when (magic1 ^ magic2) & mask1 & mask2 == 0
        (`truth.Observation.shadowing`)."""
        start, size, magic, mask = self._matcher
        shift = (end - start - size) * 8
        return magic << shift, mask << shift

    def handles(self, header: bytes, filename: str = "probe") -> bool:
        """Whether the kernel would pick this entry for a file named `filename` starting with
        `header` (fs/binfmt_misc.c check_file: enabled, then extension or masked magic at offset;
        bytes past the file's end read as zero)."""
        if not self.enabled:
            return False
        if self.extension is not None:
            _, dot, ext = filename.rpartition(".")
            return bool(dot) and ext == self.extension.removeprefix(".")
        if not self.magic:
            return False
        start, size, magic, mask = self._matcher
        window = header[start : start + size]
        if len(window) < size:
            window = window.ljust(size, b"\0")
        # One big-integer XOR and AND instead of a Python loop over every byte: this runs for
        # every (arch, entry) pair each time status is derived.
        return (int.from_bytes(window) ^ magic) & mask == 0

    @functools.cached_property
    def _matcher(self) -> tuple[int, int, int, int]:
        """(offset, length, magic, mask), magic and mask as big-endian integers (made once)."""
        size = len(self.magic)
        mask = self.mask or bytes([0xFF] * size)
        return (
            self.offset,
            size,
            int.from_bytes(self.magic),
            int.from_bytes(mask[:size].ljust(size, b"\xff")),
        )

    def registration(self) -> Registration:
        """This entry as a register string would make it (magic entries at offset 0 only)."""
        if self.extension is not None or self.offset:
            raise FormatError(f"{self.name}: only magic entries at offset 0 can be recorded")
        return Registration(self.name, self.magic, self.mask, self.interpreter, self.flags)


def parse_entry(name: str, text: str) -> Entry:
    """Parse the text of binfmt_misc/<name>; raises FormatError on anything unexpected."""
    # The kernel ends lines with "\n" only; splitlines() would also split a path at \r, \x1c...
    lines = text.rstrip("\n").split("\n") if text else []
    if not lines or lines[0] not in {"enabled", "disabled"}:
        raise FormatError(f"{name}: first line must be enabled/disabled, got {lines[:1]!r}")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        key, _, value = line.partition(" ")
        fields[key.rstrip(":")] = value.strip()
    if "interpreter" not in fields:
        raise FormatError(f"{name}: no interpreter line")
    try:
        return Entry(
            name=name,
            enabled=lines[0] == "enabled",
            interpreter=fields["interpreter"],
            flags=normalize_flags(fields.get("flags", "")),
            offset=int(fields.get("offset", "0")),
            magic=bytes.fromhex(fields.get("magic", "")),
            mask=bytes.fromhex(fields.get("mask", "")),
            extension=fields.get("extension"),
        )
    except ValueError as exc:
        raise FormatError(f"{name}: {exc}") from None
