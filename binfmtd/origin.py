"""Where a binfmt_misc entry made by another tool comes from, and how to hand it to binfmtd.

Two boot-time tools re-register entries after every reboot:
- systemd-binfmt reads `binfmt.d` fragments (`*.conf` files of register lines) from /etc,
  /run, /usr/local/lib and /usr/lib (and /lib when it is not the same directory); a file in an
  earlier directory replaces the same-named file in a later one, and a same-named symlink to
  /dev/null in /etc/binfmt.d masks it (binfmt.d(5)).
- binfmt-support's `update-binfmts --enable` registers the formats of its admin directory
  /var/lib/binfmts (imported from the packages' /usr/share/binfmts). `update-binfmts
  --disable NAME` unregisters one until the next boot only; `--remove` takes it out of the
  admin directory (a package upgrade that imports it again brings it back).

`find` reads those files only (no kernel, no subprocess); every path is injectable (`Roots`),
so tests point it at a temporary tree. An entry without a boot-time origin was registered at
run time by some tool (a container, qemu-binfmt-conf.sh) and does not come back after reboot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import StrEnum

BINFMT_D_DIRS = ("/etc/binfmt.d", "/run/binfmt.d", "/usr/local/lib/binfmt.d", "/usr/lib/binfmt.d")


class Tool(StrEnum):
    """The boot-time tool that registers an entry."""

    SYSTEMD_BINFMT = "systemd-binfmt"
    BINFMT_SUPPORT = "binfmt-support"


@dataclass(frozen=True)
class Roots:
    """The directories read, in systemd's precedence order for `binfmt_d`."""

    binfmt_d: tuple[str, ...] = (*BINFMT_D_DIRS[:3], *BINFMT_D_DIRS[3:], "/lib/binfmt.d")
    binfmts_admin: str = "/var/lib/binfmts"

    @property
    def masks(self) -> str:
        """Where an administrator's override (and so the mask) goes: the first binfmt.d."""
        return self.binfmt_d[0]


@dataclass(frozen=True)
class Origin:
    """One boot-time source of the entry `name`.

    `path` is the file that defines it; `shares` the other entries the same file defines (a
    mask covers the whole file); `package` the owning package when the file records it;
    `active` is False when the source is already masked or disabled (then the entry in the
    kernel is a leftover from before, gone at the next reboot).
    """

    tool: Tool
    name: str
    path: str
    active: bool = True
    shares: tuple[str, ...] = ()
    package: str | None = None
    interpreter: str = ""
    mask_dir: str = "/etc/binfmt.d"

    def command(self) -> str:
        """The shell command that stops this source from registering `name` at boot."""
        if self.tool is Tool.BINFMT_SUPPORT:
            # `--disable` alone lasts until the next boot (binfmt-support.service re-enables
            # every format of its admin directory); removing the format from it persists.
            package = self.package or "PACKAGE"
            return f"update-binfmts --package {package} --remove {self.name} {self.interpreter}"
        base = os.path.basename(self.path)
        if os.path.dirname(self.path) == self.mask_dir:  # the admin's own file: move it aside
            return f"mv {self.path} {self.path}.disabled"
        return f"ln -s /dev/null {os.path.join(self.mask_dir, base)}"

    def describe(self) -> str:
        """One sentence: who registers it, from which file, and the command to hand it over."""
        what = "binfmt-support format" if self.tool is Tool.BINFMT_SUPPORT else "binfmt.d fragment"
        owner = f" of package {self.package}" if self.package else ""
        also = f" (the same file also defines {', '.join(self.shares)})" if self.shares else ""
        if not self.active:
            return (
                f"{self.tool} {what} {self.path}{owner} is masked: this entry is left from "
                "before and does not come back after a reboot"
            )
        return (
            f"registered at boot by {self.tool} from {what} {self.path}{owner}{also}; "
            f"to hand it to binfmtd: {self.command()}"
        )


@dataclass(frozen=True)
class Index:
    """Every boot-time origin found, by entry name."""

    by_name: dict[str, tuple[Origin, ...]] = field(default_factory=dict)

    def of(self, name: str) -> tuple[Origin, ...]:
        """The origins of entry `name` (empty: registered at run time by some tool)."""
        return self.by_name.get(name, ())

    def describe(self, name: str) -> str:
        """What the conflict report says about where `name` comes from."""
        found = self.of(name)
        if not found:
            return (
                "no boot-time source (binfmt.d, binfmt-support) defines it: a tool registered "
                "it at run time and it will not come back after a reboot"
            )
        return "; ".join(o.describe() for o in found)


def scan(roots: Roots | None = None) -> Index:
    """Read every binfmt.d fragment and binfmt-support format (unreadable files: skipped)."""
    roots = roots or Roots()
    found: dict[str, list[Origin]] = {}
    for origin in [*_binfmt_d(roots), *_binfmt_support(roots)]:
        found.setdefault(origin.name, []).append(origin)
    return Index({name: tuple(origins) for name, origins in found.items()})


def find(name: str, roots: Roots | None = None) -> tuple[Origin, ...]:
    """The boot-time origins of the entry `name`."""
    return scan(roots).of(name)


def _effective_fragments(roots: Roots) -> dict[str, str]:
    """File name -> the path systemd-binfmt reads for it (earlier directories win)."""
    chosen: dict[str, str] = {}
    seen_dirs: set[str] = set()
    for directory in roots.binfmt_d:
        real = os.path.realpath(directory)
        if real in seen_dirs:
            continue  # /lib -> /usr/lib on merged-/usr systems
        seen_dirs.add(real)
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for base in names:
            if base.endswith(".conf"):
                chosen.setdefault(base, os.path.join(directory, base))
    return chosen


def _binfmt_d(roots: Roots) -> list[Origin]:
    out: list[Origin] = []
    shadowed = _shadowed_fragments(roots)
    for base, path in sorted(_effective_fragments(roots).items()):
        if _is_mask(path):
            masked = shadowed.get(base)
            if masked:
                out.extend(_fragment_origins(masked, roots, active=False))
            continue
        out.extend(_fragment_origins(path, roots, active=True))
    return out


def _shadowed_fragments(roots: Roots) -> dict[str, str]:
    """File name -> the first non-mask fragment of that name (what a mask hides)."""
    out: dict[str, str] = {}
    for directory in roots.binfmt_d:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for base in names:
            path = os.path.join(directory, base)
            if base.endswith(".conf") and base not in out and not _is_mask(path):
                out[base] = path
    return out


def _fragment_origins(path: str, roots: Roots, *, active: bool) -> list[Origin]:
    names = _fragment_names(path)
    return [
        Origin(
            Tool.SYSTEMD_BINFMT,
            name,
            path,
            active=active,
            shares=tuple(n for n in names if n != name),
            mask_dir=roots.masks,
        )
        for name in names
    ]


def _fragment_names(path: str) -> list[str]:
    """The entry names a fragment registers: field 1 of each register line (any delimiter)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    names = []
    for raw in lines:
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        fields = line.split(line[0])
        if len(fields) > 2 and fields[1]:
            names.append(fields[1])
    return names


def _is_mask(path: str) -> bool:
    """binfmt.d(5): a symlink to /dev/null, or an empty file, masks the same-named file."""
    try:
        return os.path.realpath(path) == "/dev/null" or os.path.getsize(path) == 0
    except OSError:
        return False


def _binfmt_support(roots: Roots) -> list[Origin]:
    try:
        names = sorted(os.listdir(roots.binfmts_admin))
    except OSError:
        return []
    out = []
    for name in names:
        fields = _binfmts_fields(os.path.join(roots.binfmts_admin, name))
        if fields is None:
            continue
        out.append(
            Origin(
                Tool.BINFMT_SUPPORT,
                name,
                os.path.join(roots.binfmts_admin, name),
                package=fields["package"],
                interpreter=fields["interpreter"],
            )
        )
    return out


def _binfmts_fields(path: str) -> dict[str, str] | None:
    """An admin-directory format file: line 1 the package, then fixed fields (update-binfmts)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().split("\n")
    except OSError:
        return None
    if len(lines) < len(_ADMIN_FIELDS) or not lines[0]:
        return None
    return dict(zip(_ADMIN_FIELDS, lines, strict=False))


# update-binfmts' admin file, one value a line (binfmt-support 2.x).
_ADMIN_FIELDS = ("package", "type", "offset", "magic", "mask", "interpreter")
