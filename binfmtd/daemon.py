"""`binfmtd`: the entry point. `--oneshot` provisions and exits; without it the daemon runs."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from binfmtd import __version__, config, log, ns
from binfmtd.preflight import Exit, PreflightError


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="binfmtd",
        description="Keep QEMU user-mode emulators registered in binfmt_misc with the F flag, "
        "each proven by running a probe of its architecture.",
        epilog="Exit codes: 0 ok; 1 an architecture failed; 64 usage; 65 kernel < 4.8; "
        "66 no binfmt_misc; 67 cannot mount binfmt_misc; 68 binfmt_misc disabled; 69 not root; "
        "70 sandbox unsupported; 71 already running; 72 internal error; 78 bad configuration.",
    )
    parser.add_argument(
        "--config",
        "-c",
        help=f"YAML configuration (default {config.DEFAULT_PATH} "
        "when it exists, else built-in defaults)",
    )
    parser.add_argument(
        "--oneshot", action="store_true", help="provision, verify, print a table and exit"
    )
    parser.add_argument(
        "--sandbox",
        action="store_true",
        help="run in a new user+mount namespace with a private binfmt_misc "
        "(Linux >= 6.7): nothing on the host changes",
    )
    parser.add_argument("--json", action="store_true", help="with --oneshot: print JSON")
    parser.add_argument("--version", action="version", version=f"binfmtd {__version__}")
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="with --oneshot: after `--`, a command to run once provisioning "
        "succeeded (inside the sandbox with --sandbox); its exit code is returned",
    )
    args = parser.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if args.command and not args.oneshot:
        parser.error("a command after -- needs --oneshot")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run binfmtd; returns the exit code."""
    args = parse_args(argv)
    try:
        cfg = _load_config(args.config)
    except config.ConfigError as exc:
        print(f"binfmtd: bad configuration: {exc}", file=sys.stderr)
        return Exit.CONFIG
    log.configure(cfg.log.level, cfg.log.format)
    try:
        if args.sandbox:
            ns.enter_sandbox(cfg.binfmt_misc, _socket_gids(cfg))
            cfg = config.for_sandbox(cfg)
        if args.oneshot:
            code = oneshot(cfg, sandbox=args.sandbox, as_json=args.json)
            if code != Exit.OK or not args.command:
                return code
            return _run_command(args.command)
        from binfmtd.service import serve

        return serve(cfg, sandbox=args.sandbox, config_path=args.config)
    except ns.SandboxError as exc:
        print(f"binfmtd: --sandbox: {exc}", file=sys.stderr)
        return Exit.SANDBOX_UNSUPPORTED
    except PreflightError as exc:
        print(f"binfmtd: {exc.message}", file=sys.stderr)
        return exc.code


def _run_command(command: list[str]) -> int:
    """Run the user's command with our stdio; in --sandbox it sees the private instance."""
    import subprocess

    sys.stdout.flush()
    try:
        return subprocess.call(command)
    except OSError as exc:
        print(f"binfmtd: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127


def _socket_gids(cfg: config.Config) -> list[int]:
    """The gids of the configured socket groups that exist (kept mapped in --sandbox)."""
    import grp

    kit = cfg.buildkit.socket_group if cfg.buildkit.enabled else None
    gids = []
    for name in {cfg.api.group, kit} - {None}:
        try:
            gids.append(grp.getgrnam(str(name)).gr_gid)
        except KeyError:
            continue
    return gids


def _load_config(path: str | None) -> config.Config:
    if path is None and os.path.exists(config.DEFAULT_PATH):
        path = config.DEFAULT_PATH
    return config.load(path, require_safe_mode=os.geteuid() == 0 and not ns.in_user_namespace())


def oneshot(cfg: config.Config, *, sandbox: bool, as_json: bool) -> int:
    """Preflight, install, register, verify; print the table; exit 1 if any arch failed."""
    from binfmtd.lock import Lock

    lock = Lock(cfg.lock_file, cfg.install_dir)
    lock.acquire()
    try:
        return _provision_once(cfg, sandbox=sandbox, as_json=as_json)
    finally:
        lock.release()


def _provision_once(cfg: config.Config, *, sandbox: bool, as_json: bool) -> int:
    from binfmtd import preflight
    from binfmtd.engine import Engine
    from binfmtd.plan import describe
    from binfmtd.status import ArchState

    logger = log.get("binfmtd.oneshot")
    engine = Engine(cfg, logger)
    preflight.run_all(engine.kernel)
    started = time.monotonic()
    engine.detect_native()
    report = engine.tick()
    total = round((time.monotonic() - started) * 1000, 1)
    statuses = engine.statuses()
    if as_json:
        import json

        print(
            json.dumps(
                {
                    "sandbox": sandbox,
                    "durations_ms": {**report.durations_ms, "total": total},
                    "actions": [describe(a) for a in report.actions],
                    "native": engine.native,
                    "platforms": engine.verified_platforms(),
                    "arches": [s.to_json() for s in statuses],
                },
                indent=2,
            )
        )
    else:
        print(render_table([s.to_json() for s in statuses]))
        print(
            f"\nnative: {', '.join(engine.native) or '-'}; verified platforms: "
            f"{','.join(engine.verified_platforms())}"
        )
        print(
            "timings (ms): "
            + ", ".join(f"{k} {v}" for k, v in {**report.durations_ms, "total": total}.items())
        )
    # A foreign entry left alone counts as a failure here even when it works: the conflict
    # is unresolved until the operator chooses (conflict_policy).
    bad = [s for s in statuses if s.state not in {ArchState.VERIFIED, ArchState.DISABLED}]
    for row in bad:
        print(f"binfmtd: {row.arch}: {row.state}: {row.error or 'not verified'}", file=sys.stderr)
    return Exit.ARCH_FAILED if bad else Exit.OK


def render_table(rows: list[dict[str, Any]]) -> str:
    """An aligned table: arch, OCI platform, state, flags, interpreter, verified."""
    from binfmtd.cli import table

    header = ("ARCH", "PLATFORM", "STATE", "FLAGS", "INTERPRETER", "VERIFIED")
    return table(header, [_table_row(row) for row in rows])


def _table_row(row: dict[str, Any]) -> list[str]:
    probe = row.get("probe") or {}
    verified = f"yes ({probe['duration_ms']} ms)" if probe.get("ok") else "no"
    return [
        row["arch"],
        ",".join(row["platforms"]) or "-",
        row["state"],
        row["flags"] or "-",
        row["interpreter"] or "-",
        verified,
    ]


if __name__ == "__main__":
    raise SystemExit(main())
