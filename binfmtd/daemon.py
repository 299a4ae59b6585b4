"""`binfmtd`: the entry point. `--oneshot` provisions and exits; without it the daemon runs."""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from binfmtd import __version__, config, log, ns
from binfmtd.cli import Parser, run_quietly
from binfmtd.preflight import Exit, PreflightError

if TYPE_CHECKING:
    from binfmtd.sources import PackageOwners


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = Parser(
        prog="binfmtd",
        description="Keep QEMU user-mode emulators registered in binfmt_misc with the F flag, "
        "each proven by running a probe of its architecture.",
        epilog="Exit codes: 0 ok; 1 an architecture failed; 64 usage; 65 kernel < 4.8; "
        "66 no binfmt_misc; 67 cannot mount binfmt_misc; 68 binfmt_misc disabled; 69 not root; "
        "70 sandbox unsupported; 71 already running; 72 internal error; 78 bad configuration; "
        "128+N --oneshot stopped by signal N (its sandbox removed); "
        "141 stdout closed early (e.g. piped into head).",
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
        nargs="?",
        const="",
        type=_sandbox_arg,
        metavar="NAME",
        help="run in a new user+mount namespace with a private binfmt_misc (Linux >= 6.7): "
        "nothing registered reaches the host; files live in /run/binfmtd-sandbox/NAME and "
        "/var/lib/binfmtd-sandbox/NAME, removed on exit. NAME defaults to oneshot-PID with "
        "--oneshot, else 'default'; sandboxes with different names run side by side",
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
    if args.json and not args.oneshot:
        parser.error("--json needs --oneshot (the daemon logs JSON when not on a terminal)")
    return args


def _sandbox_arg(text: str) -> str:
    if text == "":
        return text
    try:
        return ns.sandbox_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run binfmtd; returns the exit code."""
    args = parse_args(argv)
    if args.config is not None:
        # Relative to where binfmtd was started: reload (maybe in a sandbox) reads the same file.
        args.config = os.path.abspath(args.config)
    try:
        cfg = _load_config(args.config)
    except config.ConfigError as exc:
        print(f"binfmtd: bad configuration: {exc}", file=sys.stderr)
        return Exit.CONFIG
    log.configure(cfg.log.level, cfg.log.format, lazy=True)  # structlog: on the first event
    code = run_quietly(lambda: _run(args, cfg), "binfmtd")
    if argv is None and args.oneshot:  # the console command, not a caller in this process
        _leave(code)
    return code


def _leave(code: int) -> NoReturn:
    """End a finished `--oneshot` process without the interpreter's teardown, which frees every
    object one by one: about 25 ms of a ~400 ms cold provision, measured on a 2-core VM. All
    that teardown would still do is done by then: output and logs are flushed here, the pass
    has stopped its threads and probe runner, the lock and the sandbox are released."""
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    logging = sys.modules.get("logging")  # flush its handlers, if anything imported it
    if logging is not None:
        logging.shutdown()
    os._exit(code)


class Stopped(BaseException):
    """SIGTERM, SIGHUP or SIGINT ended a --oneshot run: its sandbox is removed on the way out,
    and binfmtd exits 128 + the signal's number, as a shell reports a killed process."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop_on_signals() -> None:
    """--oneshot: SIGTERM, SIGHUP and SIGINT raise `Stopped` in the main thread (cleanup runs)."""

    def stop(signum: int, _frame: object) -> None:
        raise Stopped(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, stop)


def _run(args: argparse.Namespace, cfg: config.Config) -> int:
    sandbox = None
    if args.sandbox is not None:
        name = args.sandbox or ns.default_sandbox_name(oneshot=args.oneshot, pid=os.getpid())
        sandbox = ns.SandboxDirs(name)
    entered = False
    if args.oneshot:
        _stop_on_signals()
    try:
        if sandbox is not None:
            ns.sweep_stale_oneshots()
            ns.enter_sandbox(cfg.binfmt_misc, _socket_gids(cfg))
            cfg = config.for_sandbox(cfg, sandbox.runtime, sandbox.state)
            # The lock in the sandbox's runtime directory makes its directories ours to remove.
            entered = cfg.lock_file.startswith(sandbox.runtime + "/")
        if args.oneshot:
            code = oneshot(cfg, sandbox=sandbox, as_json=args.json)
            if code != Exit.OK and args.command:
                print(
                    f"binfmtd: not running {args.command[0]}: not every architecture was "
                    "provisioned and verified (see above)",
                    file=sys.stderr,
                )
            if code != Exit.OK or not args.command:
                return code
            return _run_command(args.command)
        from binfmtd.service import serve

        startup_done()
        return serve(cfg, sandbox=sandbox, config_path=args.config, safe_mode=_safe_mode)
    except ns.SandboxError as exc:
        print(f"binfmtd: --sandbox: {exc}", file=sys.stderr)
        return Exit.SANDBOX_UNSUPPORTED
    except Stopped as exc:
        signal.signal(exc.signum, signal.SIG_IGN)  # a second one must not cut the cleanup short
        print(f"binfmtd: stopped by {signal.Signals(exc.signum).name}", file=sys.stderr)
        return 128 + exc.signum
    except PreflightError as exc:
        if exc.code == Exit.ALREADY_RUNNING:
            entered = False  # the directories belong to the sandbox that holds the lock
        raise
    finally:
        if sandbox is not None and entered:
            sandbox.remove()


def startup_done() -> None:
    """Start-up's imports are done: when the entry point (`binfmtd.__main__`) kept the garbage
    collector off for them, what they made moves out of its reach for good and it runs again."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def _run_command(command: list[str]) -> int:
    """Run the user's command with our stdio; in --sandbox it sees the private instance.

    Its exit code as a shell gives it: the command's own, 128 + N when signal N killed it
    (137 for SIGKILL, 139 for SIGSEGV: never the 247 or 245 a negative code would wrap to),
    126 when it exists but cannot be run, 127 when it is not found."""
    import subprocess

    sys.stdout.flush()
    try:
        code = subprocess.call(command)
    except OSError as exc:
        print(f"binfmtd: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        print(f"binfmtd: {command[0]} was killed by {name}", file=sys.stderr)
        return 128 - code
    return code


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
    return config.load(path, require_safe_mode=_safe_mode)


# Decided once, before --sandbox enters its user namespace: a reload inside the sandbox must
# apply the same trust rule as the start did (root on the host reads only root's files).
_safe_mode = os.geteuid() == 0 and not ns.in_user_namespace()


def oneshot(cfg: config.Config, *, sandbox: ns.SandboxDirs | None, as_json: bool) -> int:
    """Preflight, install, register, verify; print the table; exit 1 if any arch failed."""
    from binfmtd.lock import Lock

    lock = Lock(cfg.lock_file, cfg.install_dir, sandbox=sandbox.name if sandbox else None)
    lock.acquire()
    try:
        return _provision_once(cfg, sandbox=sandbox, as_json=as_json)
    finally:
        lock.release()


def _provision_once(cfg: config.Config, *, sandbox: ns.SandboxDirs | None, as_json: bool) -> int:
    """One guarded pass: per-arch failures are lines on stderr (exit 1); anything unexpected is
    one line (exit 72, the traceback only in the debug log), never a traceback for the user."""
    logger = log.get("binfmtd.oneshot")
    try:
        from binfmtd import headstart

        packages = headstart.begin(cfg)  # the package lookup runs while the rest is imported
        return _provision(cfg, sandbox=sandbox, as_json=as_json, logger=logger, packages=packages)
    except (PreflightError, BrokenPipeError):
        raise  # BrokenPipeError: stdout closed early, run_quietly ends with 141
    except Exception as exc:  # the per-pass guard of --oneshot
        logger.debug("oneshot_crashed", exc_info=True)
        print(
            f"binfmtd: internal error: {type(exc).__name__}: {exc} "
            "(set log.level: debug for the traceback)",
            file=sys.stderr,
        )
        return Exit.SOFTWARE


def _provision(
    cfg: config.Config,
    *,
    sandbox: ns.SandboxDirs | None,
    as_json: bool,
    logger: Any,
    packages: PackageOwners | None = None,
) -> int:
    from binfmtd import preflight, render, views
    from binfmtd.binfmt import credentials_warning
    from binfmtd.engine import Engine

    startup_done()
    engine = Engine(cfg, logger, packages=packages)
    preflight.run_all(engine.kernel)
    started = time.monotonic()
    engine.start_probe_runner()  # it boots while the host's own arches are detected
    engine.detect_native()
    try:
        report = engine.tick()
    finally:
        engine.close()  # the probe roots and threads: nothing runs after this pass
    durations = {**report.durations_ms, "total": round((time.monotonic() - started) * 1000, 1)}
    record = views.oneshot_record(engine, report.actions, durations, sandbox=sandbox is not None)
    if not engine.selected:
        why = cfg.why_nothing_selected(engine.native)
        print(f"binfmtd: warning: no architectures to provision: {why}", file=sys.stderr)
    if as_json:
        import json

        print(json.dumps(record.to_json(), indent=2))
    else:
        print(render.arch_table(record.arches, time.time()))
        print(
            f"\nnative: {', '.join(record.native) or '-'}; verified platforms: "
            f"{','.join(record.platforms)}"
        )
        print("timings (ms): " + ", ".join(f"{k} {v}" for k, v in durations.items()))
    # Only a verified arch or the operator's own disable is fine; a foreign entry left alone
    # is a failure even when it works: the conflict is unresolved until the operator chooses.
    bad = [s for s in engine.statuses() if not s.state.fine]
    sys.stdout.flush()
    for name in sorted(e.name for e in engine.observation.entries if "C" in e.flags):
        print(f"binfmtd: warning: {credentials_warning(name)}", file=sys.stderr)
    for row in bad:
        print(f"binfmtd: {row.arch}: {row.state}: {row.error or 'not verified'}", file=sys.stderr)
    return Exit.ARCH_FAILED if bad else Exit.OK


if __name__ == "__main__":
    raise SystemExit(main())
