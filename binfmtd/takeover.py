"""`python -m binfmtd.takeover`: hand the configured arches' qemu entries to binfmtd for good.

For each entry binfmtd will register, the boot-time sources that also register it (see
`binfmtd.origin`) are switched off with their documented command, and an entry they already
put in the kernel is removed, so the state right after this equals the state after a reboot.
Every change is appended to a manifest (one JSON object a line) so `--undo` reverts exactly
those and nothing else. Used by `scripts/install-service --take-over` / `--uninstall`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence

from binfmtd import arch as archmod
from binfmtd import config, origin

MANIFEST = "/var/lib/binfmtd/takeover.jsonl"


def entry_names(cfg: config.Config, machine: str | None = None) -> list[str]:
    """The entry names binfmtd registers with `cfg` on this host (native and compat excluded)."""
    machine = machine or platform.machine()
    native = archmod.native_arches(machine, compat32=False) + archmod.compat_candidates(machine)
    return [archmod.BY_NAME[a].entry_name for a in cfg.selected(native)]


def take_over(
    names: Sequence[str], roots: origin.Roots, binfmt_misc: str, manifest: str, *, dry_run: bool
) -> list[str]:
    """Switch off every active boot-time origin of `names`; returns the commands (run unless
    `dry_run`). Raises OSError/CalledProcessError when a step fails (earlier ones are recorded)."""
    index = origin.scan(roots)
    done: list[str] = []
    for name in names:
        for found in index.of(name):
            if not found.active or any(found.command() == c for c in done):
                continue
            done.append(found.command())
            if not dry_run:
                record = _switch_off(found)
                _append(manifest, record)
        if not dry_run and index.of(name) and _remove_entry(binfmt_misc, name):
            done.append(f"echo -1 > {binfmt_misc}/{name}")
    return done


def _switch_off(found: origin.Origin) -> dict[str, str]:
    if found.tool is origin.Tool.BINFMT_SUPPORT:
        with open(found.path, encoding="utf-8") as handle:
            saved = handle.read()
        _run(["update-binfmts", "--package", found.package or "", "--remove", found.name,
              found.interpreter])  # fmt: skip
        return {"kind": "binfmts-removed", "path": found.path, "content": saved}
    mask = os.path.join(found.mask_dir, os.path.basename(found.path))
    if os.path.dirname(found.path) == found.mask_dir:
        os.rename(found.path, found.path + ".disabled")
        return {"kind": "renamed", "path": found.path}
    os.makedirs(found.mask_dir, exist_ok=True)
    os.symlink("/dev/null", mask)
    return {"kind": "mask", "path": mask}


def _remove_entry(binfmt_misc: str, name: str) -> bool:
    path = os.path.join(binfmt_misc, name)
    if not os.path.exists(path):
        return False
    with open(path, "w", encoding="ascii") as handle:
        handle.write("-1")
    return True


def undo(manifest: str) -> list[str]:
    """Revert what `take_over` recorded in `manifest` (newest first), then delete it."""
    try:
        with open(manifest, encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle if line.strip()]
    except FileNotFoundError:
        return []
    done = []
    for record in reversed(records):
        path = record["path"]
        if record["kind"] == "mask" and os.path.islink(path) and os.readlink(path) == "/dev/null":
            os.unlink(path)
            done.append(f"rm {path}")
        elif record["kind"] == "renamed" and os.path.exists(path + ".disabled"):
            os.rename(path + ".disabled", path)
            done.append(f"mv {path}.disabled {path}")
        elif record["kind"] == "binfmts-removed" and not os.path.exists(path):
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(record["content"])
            done.append(f"restored {path} (update-binfmts --enable registers it again)")
    os.unlink(manifest)
    return done


def _append(manifest: str, record: dict[str, str]) -> None:
    os.makedirs(os.path.dirname(manifest), exist_ok=True)
    with open(manifest, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; exit 0 done, 1 a step failed, 78 bad configuration."""
    parser = argparse.ArgumentParser(prog="python -m binfmtd.takeover", description=__doc__)
    parser.add_argument("--config", default=config.DEFAULT_PATH)
    parser.add_argument("--manifest", default=MANIFEST)
    parser.add_argument("--binfmt-misc", default="/proc/sys/fs/binfmt_misc")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--undo", action="store_true", help="revert what the manifest records")
    args = parser.parse_args(argv)
    try:
        if args.undo:
            steps = undo(args.manifest)
        else:
            path = args.config if os.path.exists(args.config) else None
            names = entry_names(config.load(path))
            steps = take_over(
                names, origin.Roots(), args.binfmt_misc, args.manifest, dry_run=args.dry_run
            )
    except config.ConfigError as exc:
        print(f"takeover: bad configuration: {exc}", file=sys.stderr)
        return 78
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"takeover: {exc}", file=sys.stderr)
        return 1
    for step in steps:
        print(step)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
