"""binfmtctl: ask binfmtd what runs, and tell it what to do, over its Unix socket.

Exit codes:
  0  ok
  1  check failed, or not every requested architecture verified
  3  binfmtd is not reachable (not running, stale socket, no answer), or for
     status --offline: binfmt_misc is not mounted or not readable
  4  permission denied (socket not accessible, or the action needs root)
  5  binfmtd answered with an error
  64  usage error (bad option, unknown command, no command)
  127  exec: the command (or nsenter) was not found
  141  stdout was closed early (e.g. `binfmtctl status | head -1`); nothing else is printed

Architectures may be named as QEMU does (aarch64), as Docker/OCI platforms (linux/arm64,
arm64, arm/v7, amd64, 386, ppc64le, loong64) or as Debian does (armhf, ppc64el).

Imports stay stdlib-only and few: this runs in shell prompts and CI steps, so start-up time
matters. The HTTP client is a few lines over a raw socket because http.client (with email and
ssl behind it) costs more start-up time than the rest of this command together. Answers are
read into `binfmtd.wire` records, the contract the daemon builds them from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from enum import IntEnum

from binfmtd import render, wire
from binfmtd.wire import ExitError as CliError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Sequence
    from typing import Any, NoReturn

    from binfmtd.wire import R

DEFAULT_SOCKET = "/run/binfmtd/binfmtd.sock"
SANDBOX_SOCKETS = "/run/binfmtd-sandbox/*/binfmtd.sock"  # one per --sandbox=NAME
START_HINT = "start it with `systemctl start binfmtd`"
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes, its final NUL included


class ExitCode(IntEnum):
    """What `main` returns; documented in the module docstring and --help."""

    OK = 0
    NOT_OK = 1
    UNREACHABLE = 3
    DENIED = 4
    DAEMON_ERROR = 5
    USAGE = 64
    NOT_FOUND = 127
    CLOSED_PIPE = 141


# --- HTTP over AF_UNIX -----------------------------------------------------------------------


def call(path: str, method: str, target: str, body: object = None, timeout: float = 10.0) -> Any:
    """One request on a fresh connection; the decoded JSON answer, or CliError."""
    import socket  # here: `binfmtd --oneshot` uses this module's parser but never connects

    payload = b"" if body is None else json.dumps(body).encode()
    head = f"{method} {target} HTTP/1.1\r\nHost: binfmtd\r\nConnection: close\r\n"
    if method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        _connect(sock, path, timeout)
        try:
            sock.sendall(head.encode() + b"\r\n" + payload)
            status, data = _read_response(sock)
        except TimeoutError:
            raise CliError(
                ExitCode.UNREACHABLE, f"binfmtd did not answer within {timeout:g} s"
            ) from None
        except OSError as exc:
            raise CliError(
                ExitCode.UNREACHABLE, f"connection to {path} failed: {exc.strerror}"
            ) from None
    return _decode(status, data)


def _no_socket(path: str) -> str:
    """No socket at `path`: how to start binfmtd, or, when only --sandbox daemons run, the
    `--socket` option that reaches each of them."""
    import glob

    sandboxes = sorted(glob.glob(SANDBOX_SOCKETS)) if path == DEFAULT_SOCKET else []
    if not sandboxes:
        return f"binfmtd is not running (no socket at {path}); {START_HINT}"
    lines = [f"  binfmtctl --socket {s} ..." for s in sandboxes]
    return (
        f"no system binfmtd (no socket at {path}); {len(sandboxes)} --sandbox daemons run: "
        "name one with --socket (or BINFMTD_SOCKET):\n" + "\n".join(lines)
    )


def _connect(sock: socket.socket, path: str, timeout: float) -> None:
    try:
        sock.connect(path)
    except FileNotFoundError:
        raise CliError(ExitCode.UNREACHABLE, _no_socket(path)) from None
    except ConnectionRefusedError:
        message = f"binfmtd is not running (connection refused on {path}); {START_HINT}"
        raise CliError(ExitCode.UNREACHABLE, message) from None
    except PermissionError:
        message = f"permission denied on {path}: run as root or as a member of the socket's group"
        raise CliError(ExitCode.DENIED, message) from None
    except TimeoutError:
        raise CliError(
            ExitCode.UNREACHABLE, f"binfmtd did not accept within {timeout:g} s"
        ) from None
    except OSError as exc:
        raise CliError(ExitCode.UNREACHABLE, _connect_error(path, exc)) from None


def _connect_error(path: str, exc: OSError) -> str:
    """What an OSError from connect() means; some carry no errno (a path too long)."""
    size = len(os.fsencode(path))
    if size > UNIX_PATH_MAX:
        return (
            f"socket path too long for a Unix socket ({size} bytes, at most {UNIX_PATH_MAX}): "
            f"{path}; give a shorter path with --socket (or BINFMTD_SOCKET)"
        )
    return f"cannot connect to {path}: {exc.strerror or exc}"


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise CliError(ExitCode.DAEMON_ERROR, "binfmtd closed the connection without answering")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    try:
        status, length = int(lines[0].split(" ")[1]), int(fields.get("content-length", "-1"))
    except (IndexError, ValueError):
        raise CliError(ExitCode.DAEMON_ERROR, "binfmtd sent a malformed answer") from None
    while length < 0 or len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, body


def _decode(status: int, data: bytes) -> Any:
    try:
        answer = json.loads(data)
    except ValueError:
        raise CliError(
            ExitCode.DAEMON_ERROR, f"binfmtd sent a non-JSON answer (HTTP {status})"
        ) from None
    if status < 400:
        return answer
    message = answer.get("error", "") if isinstance(answer, dict) else str(answer)
    code = ExitCode.DENIED if status == 403 else ExitCode.DAEMON_ERROR
    raise CliError(code, f"binfmtd refused: {message} (HTTP {status})")


def read(kind: type[R], answer: Any) -> R:
    """The daemon's JSON answer as a wire record, or exit 5 saying what did not fit."""
    try:
        return kind.from_json(answer)
    except ValueError as exc:
        raise CliError(ExitCode.DAEMON_ERROR, f"binfmtd sent an unexpected answer: {exc}") from None


# --- offline ---------------------------------------------------------------------------------


def offline_entries(root: str) -> list[dict[str, object]]:
    """binfmt_misc entries read directly, one dict each (name, enabled, flags, interpreter,
    offset, magic and mask in hex or extension, state), by name; nothing was executed, so
    each is `unverified` (`unreadable`, with `error`, when its file could not be read).
    Raises CliError (exit 3) when binfmt_misc is not mounted at `root` or not readable."""
    from binfmtd.binfmt import FormatError, parse_entry

    names = _offline_names(root)
    found: list[dict[str, object]] = []
    for name in sorted(names - {"register", "status"}):
        try:
            with open(os.path.join(root, name), encoding="latin-1") as handle:
                entry = parse_entry(name, handle.read())
        except (OSError, FormatError) as exc:
            found.append({"name": name, "state": "unreadable", "error": str(exc)})
            continue
        row: dict[str, object] = {
            "name": name,
            "enabled": entry.enabled,
            "flags": entry.flags,
            "interpreter": entry.interpreter,
            "offset": entry.offset,
        }
        if entry.extension is not None:
            row["extension"] = entry.extension
        else:
            row.update(magic=entry.magic.hex(), mask=entry.mask.hex())
        found.append(row | {"state": "unverified"})
    return found


def offline_rows(entries: list[dict[str, object]]) -> list[list[str]]:
    """`offline_entries` as table rows: ENTRY, ENABLED, FLAGS, INTERPRETER, STATE."""
    rows = []
    for e in entries:
        if e["state"] == "unreadable":
            rows.append([str(e["name"]), "?", "-", str(e["error"]), "unreadable"])
            continue
        enabled = "enabled" if e["enabled"] else "disabled"
        rows.append(
            [str(e["name"]), enabled, str(e["flags"]) or "-", str(e["interpreter"]), "unverified"]
        )
    return rows


def _instance_enabled(root: str) -> bool | None:
    """What binfmt_misc/status says: False when the instance is disabled as a whole (no
    entry runs, whatever each says), None when it cannot be read."""
    try:
        with open(os.path.join(root, "status"), encoding="latin-1") as handle:
            return handle.read().strip() != "disabled"
    except OSError:
        return None


def _offline_names(root: str) -> set[str]:
    mount = f"run: mount -t binfmt_misc binfmt_misc {root}"
    try:
        names = set(os.listdir(root))
    except FileNotFoundError:
        raise CliError(
            ExitCode.UNREACHABLE, f"cannot read {root}: is binfmt_misc mounted? ({mount})"
        ) from None
    except OSError as exc:
        raise CliError(
            ExitCode.UNREACHABLE, f"cannot read {root}: {exc.strerror} (binfmt_misc not readable)"
        ) from None
    if "register" not in names:
        raise CliError(ExitCode.UNREACHABLE, f"binfmt_misc is not mounted at {root}; {mount}")
    if not os.access(os.path.join(root, "status"), os.R_OK):
        raise CliError(ExitCode.DENIED, f"binfmt_misc at {root} is not readable by this user")
    return names


def offline_status(root: str, *, as_json: bool = False) -> int:
    """`status --offline [--json]`: what the kernel has, without asking the daemon; with
    --json `{"offline": true, "binfmt_misc": root, "instance_enabled": bool | null,
    "entries": [offline_entries...]}`. A disabled instance is said: no entry then runs."""
    entries = offline_entries(root)
    enabled = _instance_enabled(root)
    if as_json:
        doc = {
            "offline": True,
            "binfmt_misc": root,
            "instance_enabled": enabled,
            "entries": entries,
        }
        print(json.dumps(doc, indent=2))
        return ExitCode.OK
    rows = offline_rows(entries)
    print(render.table(("ENTRY", "ENABLED", "FLAGS", "INTERPRETER", "STATE"), rows))
    if enabled is False:
        print(
            f"\nbinfmt_misc is disabled as a whole ({root}/status says disabled): no entry "
            f"runs, whatever it says; enable it with `echo 1 > {root}/status`"
        )
    print(f"\n{len(rows)} entries; offline: read from {root}, no probe ran, so none is verified")
    return ExitCode.OK


# --- commands --------------------------------------------------------------------------------


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2))


def cmd_status(args: argparse.Namespace) -> int:
    """status: the daemon's view, or the kernel's with --offline."""
    if args.offline:
        return offline_status(args.binfmt_misc, as_json=args.json)
    answer = call(args.socket, "GET", "/v1/status", timeout=args.timeout)
    status = read(wire.StatusRecord, answer)
    print(json.dumps(answer, indent=2) if args.json else render.status_page(status, time.time()))
    return ExitCode.OK


def cmd_platforms(args: argparse.Namespace) -> int:
    """platforms: ready for `docker buildx build --platform`."""
    if args.format == "binfmt":
        answer = call(args.socket, "GET", "/v1/platforms?format=binfmt", timeout=args.timeout)
        _print_json(read(wire.BinfmtRecord, answer).to_json())
        return ExitCode.OK
    answer = call(args.socket, "GET", "/v1/platforms", timeout=args.timeout)
    platforms = read(wire.PlatformsRecord, answer)
    print(json.dumps(answer, indent=2) if args.json else ",".join(platforms.platforms))
    return ExitCode.OK


def cmd_check(args: argparse.Namespace) -> int:
    """check: exit 0 only when every configured arch is registered with F and verified."""
    status = read(wire.StatusRecord, call(args.socket, "GET", "/v1/status", timeout=args.timeout))
    problems = render.check_problems(status)
    for line in problems:
        print(line)
    if not problems:
        print(f"ok: {check_summary(status.arches)}")
    return ExitCode.NOT_OK if problems else ExitCode.OK


def check_summary(arches: Sequence[wire.ArchRecord]) -> str:
    """`check`'s healthy line: how many verified, and which the operator disabled."""
    off = [a.arch for a in arches if a.state == "operator-disabled"]
    verified = len(arches) - len(off)
    if not off:
        return f"{verified} architectures registered with F and verified"
    return f"{verified} verified, {len(off)} disabled by the operator ({', '.join(off)})"


def cmd_verify(args: argparse.Namespace) -> int:
    """verify: probe now; exit 1 when any probe failed, or an arch named on the command line
    was not verified (e.g. disabled by the operator, so not probed)."""
    body = {"arches": args.arches} if args.arches else None
    answer = call(args.socket, "POST", "/v1/verify", body, timeout=args.timeout)
    result = read(wire.VerifyResult, answer)
    if args.json:
        _print_json(answer)
    for arch in result.verified:
        print(f"{arch}: verified")
    for arch in result.failed:
        print(f"{arch}: FAILED (see `binfmtctl status`)")
    for arch in result.disabled:
        print(f"{arch}: disabled by the operator (not probed)")
    named_but_off = bool(args.arches) and bool(result.disabled)
    return ExitCode.NOT_OK if result.failed or named_but_off else ExitCode.OK


def _daemon(args: argparse.Namespace) -> wire.DaemonRecord:
    """The daemon's own record (config path, sandbox name) for a hint that names them."""
    status = call(args.socket, "GET", "/v1/status", timeout=args.timeout)
    return read(wire.StatusRecord, status).daemon


def render_mutation(
    command: str, answer: Any, daemon: Callable[[], wire.DaemonRecord] | None = None
) -> str:
    """What reconcile, enable, disable and reload answered, in words."""
    if command == "reconcile":
        result = read(wire.ReconcileResult, answer)
        lines = [f"done: {action}" for action in result.actions] or ["nothing to do"]
        return "\n".join(lines + [f"error: {k}: {v}" for k, v in (result.errors or {}).items()])
    if command == "reload":
        reloaded = read(wire.ReloadResult, answer)
        text = f"reloaded; changed: {', '.join(reloaded.changed) or 'nothing'}"
        if reloaded.needs_restart:
            later = ", ".join(reloaded.needs_restart)
            how = render.restart_hint(daemon() if daemon else None)
            text += f"\nnot applied, need a restart ({how}): {later}"
        return text
    change = read(wire.ArchChange, answer)
    return f"{change.arch}: {change.state}"


def cmd_mutate(args: argparse.Namespace) -> int:
    """reconcile, enable, disable, reload: ask and show the answer."""
    if "arch" in args:
        target = f"/v1/arches/{_quote(args.arch)}/{args.command}"
    else:
        target = f"/v1/{args.command}"
    answer = call(args.socket, "POST", target, timeout=args.timeout)
    print(render_mutation(args.command, answer, lambda: _daemon(args)))
    return ExitCode.OK


def _quote(name: str) -> str:
    """Percent-encode what may not appear in a request target (slashes stay: linux/arm64)."""
    safe = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-/"
    return "".join(c if c in safe else "".join(f"%{b:02X}" for b in c.encode()) for c in name)


def cmd_worker(args: argparse.Namespace) -> int:
    """worker: the BuildKit worker's state and the buildx command for it.

    Exit 1 when the worker is enabled but not running, or a platform is refused or unproven.
    """
    answer = call(args.socket, "GET", "/v1/worker", timeout=args.timeout)
    worker = read(wire.WorkerRecord, answer)
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        daemon = None if worker.enabled else _daemon(args)
        print(render.worker_page(worker, daemon))
    return render.worker_exit_code(worker)


def exec_argv(daemon: wire.DaemonRecord, command: Sequence[str], cwd: str) -> list[str]:
    """What to exec so `command` sees the daemon's registrations, in the caller's `cwd`.

    A --sandbox daemon registers in its own user namespace's binfmt_misc, so the command must
    join that user namespace (and the mount namespace, for the same files); `--wd` keeps the
    caller's working directory there, so relative commands and paths mean what they mean
    here. No --preserve-credentials: nsenter then switches to uid/gid 0 inside, i.e. root
    there; with it, host root stays unmapped (nobody) when the sandbox maps root elsewhere.
    """
    if not daemon.sandbox:
        return list(command)
    return [
        "nsenter",
        "--target",
        str(daemon.pid),
        "--user",
        "--mount",
        f"--wd={cwd}",
        "--",
        *command,
    ]


def cmd_exec(args: argparse.Namespace) -> int:
    """exec: run a command where the daemon's emulators are registered."""
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise CliError(ExitCode.USAGE, "exec needs a command: binfmtctl exec -- CMD [ARG...]")
    status = read(wire.StatusRecord, call(args.socket, "GET", "/v1/status", timeout=args.timeout))
    argv = exec_argv(status.daemon, command, os.getcwd())
    if argv[0] == "nsenter" and os.geteuid() != 0:
        raise CliError(ExitCode.DENIED, "entering the sandbox's namespaces needs root")
    sys.stdout.flush()
    try:
        os.execvp(argv[0], argv)  # noqa: S606 - replacing ourselves is the point of exec
    except FileNotFoundError:
        raise CliError(ExitCode.NOT_FOUND, f"{argv[0]}: command not found") from None
    except PermissionError:
        raise CliError(ExitCode.DENIED, f"{argv[0]}: permission denied") from None


# --- arguments -------------------------------------------------------------------------------


def _default_socket() -> str:
    """BINFMTD_SOCKET, else the system daemon's socket, else a --sandbox daemon's if alone."""
    if "BINFMTD_SOCKET" in os.environ:
        return os.environ["BINFMTD_SOCKET"]
    if not os.path.exists(DEFAULT_SOCKET):
        import glob

        sandboxes = glob.glob(SANDBOX_SOCKETS)
        if len(sandboxes) == 1:
            return sandboxes[0]
    return DEFAULT_SOCKET


MAX_TIMEOUT_S = 86400.0  # a day: longer is a typo, and socket timeouts overflow near 1e308


def _timeout(text: str) -> float:
    """--timeout S: a finite number of seconds, > 0 and <= MAX_TIMEOUT_S (argparse: exit 64)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= MAX_TIMEOUT_S:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"{text!r} seconds: must be > 0 and <= {MAX_TIMEOUT_S:g}")
    return value


def _status_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="the raw status JSON")
    parser.add_argument("--offline", action="store_true", help="read binfmt_misc, not the daemon")
    parser.add_argument("--binfmt-misc", default="/proc/sys/fs/binfmt_misc", help="for --offline")


def _platforms_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="native and emulated, as JSON")
    parser.add_argument("--format", choices=["binfmt"], help="tonistiigi/binfmt's JSON shape")


def _verify_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "arches", nargs="*", metavar="ARCH", help="aarch64, linux/arm64, arm64...; default: all"
    )
    _json_arg(parser)


def _arch_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("arch", metavar="ARCH", help="QEMU or Docker name: aarch64, arm64, arm/v7")


def _json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="the raw JSON")


def _exec_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")


def _no_args(parser: argparse.ArgumentParser) -> None:
    pass


# name: (help, arguments, handler, default timeout in seconds). Only the chosen command's
# parser is built: building all of them costs more start-up time than the request itself.
COMMANDS = {
    "status": ("architectures, state and last verification", _status_args, cmd_status, 10.0),
    "platforms": ("comma-separated, for buildx --platform", _platforms_args, cmd_platforms, 10.0),
    "check": ("exit 0 only if all are registered with F and verified", _no_args, cmd_check, 10.0),
    "verify": ("run the probes now (all, or the named arches)", _verify_args, cmd_verify, 300.0),
    "reconcile": ("run a reconcile pass now", _no_args, cmd_mutate, 300.0),
    "enable": ("enable an architecture's binfmt_misc entry", _arch_arg, cmd_mutate, 300.0),
    "disable": ("disable an architecture's binfmt_misc entry", _arch_arg, cmd_mutate, 300.0),
    "reload": ("re-read the configuration", _no_args, cmd_mutate, 300.0),
    "worker": ("the BuildKit worker's state and buildx command", _json_arg, cmd_worker, 10.0),
    "exec": ("run CMD where the emulators are registered, in this cwd", _exec_args, cmd_exec, 10.0),
}


class Parser(argparse.ArgumentParser):
    """argparse with our usage exit code (64, EX_USAGE) instead of its 2."""

    def error(self, message: str) -> NoReturn:
        """Usage line and the problem on stderr, exit 64."""
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """Global options and the command name; the command's own options are parsed after."""
    listing = "\n".join(f"  {name:10s} {entry[0]}" for name, entry in COMMANDS.items())
    parser = Parser(
        prog="binfmtctl",
        usage="binfmtctl [--socket PATH] [--timeout S] COMMAND [ARGS...]",
        description="Query and control binfmtd, the QEMU binfmt_misc registration daemon.",
        epilog=f"commands (binfmtctl COMMAND --help for more):\n{listing}\n\n"
        + "\n\n".join(__doc__.split("\n\n")[1:3]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help=f"binfmtd's API socket (default {DEFAULT_SOCKET}; env BINFMTD_SOCKET)",
    )
    parser.add_argument(
        "--timeout",
        type=_timeout,
        metavar="S",
        help=f"seconds to wait, > 0 and <= {MAX_TIMEOUT_S:g} (10; 300 for mutations)",
    )
    parser.add_argument("command", nargs="?", metavar="COMMAND", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Both parsing stages; argparse's SystemExit (usage errors, --help) passes through.
    No command at all prints the help (on stderr) and exits 64."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.socket is None:  # looked for only when not given (it may glob for --sandbox ones)
        args.socket = _default_socket()
    if args.command is None:
        parser.print_help(sys.stderr)
        raise SystemExit(ExitCode.USAGE)
    if args.command not in COMMANDS:
        parser.error(f"unknown command {args.command!r}{_closest(args.command)}")
    text, add_arguments, handler, wait = COMMANDS[args.command]
    sub = Parser(prog=f"binfmtctl {args.command}", description=text)
    add_arguments(sub)
    sub.set_defaults(func=handler, wait=wait)
    return sub.parse_args(args.rest, namespace=args)


def _closest(command: str) -> str:
    close = [name for name in COMMANDS if name.startswith(command[:2])]
    return f"; did you mean {' or '.join(close)}?" if close else f"; one of: {', '.join(COMMANDS)}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run binfmtctl; returns the exit code (see the module docstring)."""
    try:
        args = parse(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.timeout is None:
        args.timeout = args.wait
    return run_quietly(lambda: int(args.func(args)), "binfmtctl")


def run_quietly(func: Callable[[], int], prog: str) -> int:
    """Run `func`; an ExitError becomes its message and code, a closed stdout exit 141 with
    nothing printed (no traceback, no "Exception ignored" at exit)."""
    try:
        code = func()
        sys.stdout.flush()
        return code
    except CliError as exc:
        print(f"{prog}: {exc.message}", file=sys.stderr)
        return int(exc.code)
    except BrokenPipeError:
        # The reader went away: stop quietly, and keep the interpreter's final flush quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return ExitCode.CLOSED_PIPE


if __name__ == "__main__":
    raise SystemExit(main())
