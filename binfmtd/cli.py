"""binfmtctl: ask binfmtd what runs, and tell it what to do, over its Unix socket.

Exit codes:
  0  ok
  1  check failed, or not every requested architecture verified
  2  usage error
  3  binfmtd is not reachable (not running, stale socket, no answer)
  4  permission denied (socket not accessible, or the action needs root)
  5  binfmtd answered with an error
  127  exec: the command (or nsenter) was not found

Imports stay stdlib-only and few: this runs in shell prompts and CI steps, so start-up time
matters. The HTTP client is a few lines over a raw socket because http.client (with email and
ssl behind it) costs more start-up time than the rest of this command together.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from enum import IntEnum

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

DEFAULT_SOCKET = "/run/binfmtd/binfmtd.sock"
SANDBOX_SOCKET = "/run/binfmtd-sandbox/binfmtd.sock"
START_HINT = "start it with `systemctl start binfmtd`"


class ExitCode(IntEnum):
    """What `main` returns; documented in the module docstring and --help."""

    OK = 0
    NOT_OK = 1
    USAGE = 2
    UNREACHABLE = 3
    DENIED = 4
    DAEMON_ERROR = 5
    NOT_FOUND = 127


class CliError(Exception):
    """A failure to report on stderr with its exit code."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- HTTP over AF_UNIX -----------------------------------------------------------------------


def call(path: str, method: str, target: str, body: object = None, timeout: float = 10.0) -> Any:
    """One request on a fresh connection; the decoded JSON answer, or CliError."""
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


def _connect(sock: socket.socket, path: str, timeout: float) -> None:
    try:
        sock.connect(path)
    except FileNotFoundError:
        raise CliError(
            ExitCode.UNREACHABLE, f"binfmtd is not running (no socket at {path}); {START_HINT}"
        ) from None
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
        raise CliError(ExitCode.UNREACHABLE, f"cannot connect to {path}: {exc.strerror}") from None


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


# --- rendering (pure) ------------------------------------------------------------------------


def age(seconds: float) -> str:
    """A short human age: 42s, 5m, 3h, 2d."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, no trailing blanks."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def verified_cell(probe: dict[str, Any] | None, now: float) -> str:
    """The VERIFIED column: when the last probe passed, or that it failed."""
    if not probe:
        return "never"
    when = f"{age(now - probe['at'])} ago"
    return when if probe["ok"] else f"failed {when}"


def arch_rows(arches: Sequence[dict[str, Any]], now: float) -> list[list[str]]:
    """One table row per arch entry of the status JSON."""
    return [
        [
            a["arch"],
            ",".join(a["platforms"]) or "-",
            a["state"],
            a["flags"] or "-",
            a["interpreter"] or "-",
            verified_cell(a["probe"], now),
        ]
        for a in arches
    ]


ARCH_HEADER = ("ARCH", "PLATFORMS", "STATE", "FLAGS", "INTERPRETER", "VERIFIED")


def render_status(status: dict[str, Any], now: float) -> str:
    """The human `binfmtctl status` page."""
    daemon = status["daemon"]
    last = daemon.get("last_reconcile")
    lines = [
        f"binfmtd {daemon['version']}, pid {daemon['pid']}"
        + (" (sandbox)" if daemon.get("sandbox") else "")
        + (", ready" if daemon.get("ready") else ", starting")
        + (f", last reconcile {age(now - last)} ago" if last else ", not reconciled yet"),
        f"config {daemon.get('config')}, binfmt_misc {daemon.get('binfmt_misc')}",
        f"native: {', '.join(status.get('native') or []) or '-'}",
        "",
        table(ARCH_HEADER, arch_rows(status["arches"], now)),
    ]
    lines[3:3] = [f"warning: {text}" for text in status.get("warnings") or []]
    lines += [f"{a['arch']}: {problem}" for a in status["arches"] if (problem := arch_problem(a))]
    return "\n".join(lines)


def arch_problem(entry: dict[str, Any]) -> str | None:
    """Why an arch is not registered-with-F-and-verified, or None when it is."""
    probe = entry.get("probe") or {}
    detail = entry.get("error") or probe.get("error")
    if not entry.get("registered"):
        reason = "not registered"
    elif not entry.get("enabled"):
        reason = "registered but disabled"
    elif "F" not in (entry.get("flags") or ""):
        reason = f"registered without the F flag (flags {entry.get('flags') or 'none'})"
    elif entry.get("state") != "verified":
        reason = f"not verified (state {entry.get('state')})"
    else:
        return None
    return f"{reason}: {detail}" if detail else reason


def check_problems(status: dict[str, Any]) -> list[str]:
    """Every reason `binfmtctl check` fails, one line each; empty means healthy."""
    problems = [] if status["daemon"].get("ready") else ["binfmtd: not ready (first pass running)"]
    for entry in status["arches"]:
        problem = arch_problem(entry)
        if problem:
            problems.append(f"{entry['arch']}: {problem}")
    return problems


def render_worker(worker: dict[str, Any]) -> str:
    """The worker's scalar fields, then the buildx command to use it."""
    command = worker.get("buildx_command")
    lines = [
        f"{key}: {'-' if value is None else value}"
        for key, value in worker.items()
        if key != "buildx_command" and not isinstance(value, dict | list)
    ]
    lines += [
        f"{k}: {', '.join(map(str, v)) or '-'}" for k, v in worker.items() if isinstance(v, list)
    ]
    if command:
        lines += [
            "",
            "use it with:",
            f"  {command if isinstance(command, str) else ' '.join(command)}",
        ]
    return "\n".join(lines)


# --- offline ---------------------------------------------------------------------------------


def offline_rows(root: str) -> list[list[str]]:
    """binfmt_misc entries read directly; nothing was executed, so all are unverified."""
    from binfmtd.binfmt import FormatError, parse_entry

    rows = []
    for name in sorted(os.listdir(root)):
        if name in {"register", "status"}:
            continue
        try:
            with open(os.path.join(root, name), encoding="latin-1") as handle:
                entry = parse_entry(name, handle.read())
        except (OSError, FormatError) as exc:
            rows.append([name, "?", "-", str(exc), "unreadable"])
            continue
        state = "enabled" if entry.enabled else "disabled"
        rows.append([name, state, entry.flags or "-", entry.interpreter, "unverified"])
    return rows


def offline_status(root: str) -> int:
    """`status --offline`: what the kernel has, without asking the daemon."""
    try:
        rows = offline_rows(root)
    except OSError as exc:
        hint = "is binfmt_misc mounted?" if isinstance(exc, FileNotFoundError) else exc.strerror
        raise CliError(ExitCode.UNREACHABLE, f"cannot read {root}: {hint}") from None
    print(table(("ENTRY", "ENABLED", "FLAGS", "INTERPRETER", "STATE"), rows))
    print(f"\n{len(rows)} entries; offline: read from {root}, no probe ran, so none is verified")
    return ExitCode.OK


# --- commands --------------------------------------------------------------------------------


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2))


def cmd_status(args: argparse.Namespace) -> int:
    """status: the daemon's view, or the kernel's with --offline."""
    if args.offline:
        return offline_status(args.binfmt_misc)
    status = call(args.socket, "GET", "/v1/status", timeout=args.timeout)
    print(json.dumps(status, indent=2) if args.json else render_status(status, time.time()))
    return ExitCode.OK


def cmd_platforms(args: argparse.Namespace) -> int:
    """platforms: ready for `docker buildx build --platform`."""
    if args.format == "binfmt":
        _print_json(call(args.socket, "GET", "/v1/platforms?format=binfmt", timeout=args.timeout))
        return ExitCode.OK
    answer = call(args.socket, "GET", "/v1/platforms", timeout=args.timeout)
    print(json.dumps(answer, indent=2) if args.json else ",".join(answer["platforms"]))
    return ExitCode.OK


def cmd_check(args: argparse.Namespace) -> int:
    """check: exit 0 only when every configured arch is registered with F and verified."""
    status = call(args.socket, "GET", "/v1/status", timeout=args.timeout)
    problems = check_problems(status)
    for line in problems:
        print(line)
    if not problems:
        print(f"ok: {len(status['arches'])} architectures registered with F and verified")
    return ExitCode.NOT_OK if problems else ExitCode.OK


def cmd_verify(args: argparse.Namespace) -> int:
    """verify: probe now; exit 1 when any probe failed."""
    body = {"arches": args.arches} if args.arches else None
    answer = call(args.socket, "POST", "/v1/verify", body, timeout=args.timeout)
    if args.json:
        _print_json(answer)
    failed = answer.get("failed") or []
    for arch in answer.get("verified") or []:
        print(f"{arch}: verified")
    for arch in failed:
        print(f"{arch}: FAILED (see `binfmtctl status`)")
    return ExitCode.NOT_OK if failed else ExitCode.OK


def render_mutation(answer: dict[str, Any]) -> str:
    """What reconcile, enable, disable and reload answered, in words; JSON if unknown."""
    if "actions" in answer:
        lines = [f"done: {action}" for action in answer["actions"]] or ["nothing to do"]
        return "\n".join(
            lines + [f"error: {k}: {v}" for k, v in (answer.get("errors") or {}).items()]
        )
    if "arch" in answer and "state" in answer:
        return f"{answer['arch']}: {answer['state']}"
    if "reloaded" in answer:
        text = f"reloaded; changed: {', '.join(answer.get('changed') or []) or 'nothing'}"
        later = answer.get("needs_restart") or []
        if later:
            text += f"\nnot applied, need a restart (systemctl restart binfmtd): {', '.join(later)}"
        return text
    return json.dumps(answer, indent=2)


def cmd_mutate(args: argparse.Namespace) -> int:
    """reconcile, enable, disable, reload: ask and show the answer."""
    target = f"/v1/arches/{args.arch}/{args.command}" if "arch" in args else f"/v1/{args.command}"
    answer = call(args.socket, "POST", target, timeout=args.timeout)
    print(render_mutation(answer))
    return ExitCode.OK


def cmd_worker(args: argparse.Namespace) -> int:
    """worker: the BuildKit worker's state and the buildx command for it."""
    worker = call(args.socket, "GET", "/v1/worker", timeout=args.timeout)
    print(json.dumps(worker, indent=2) if args.json else render_worker(worker))
    return ExitCode.OK


def exec_argv(daemon: dict[str, Any], command: Sequence[str]) -> list[str]:
    """What to exec so `command` sees the daemon's registrations.

    A --sandbox daemon registers in its own user namespace's binfmt_misc, so the command must
    join that user namespace (and the mount namespace, for the same files). No
    --preserve-credentials: nsenter then switches to uid/gid 0 inside, i.e. root there; with it,
    host root stays unmapped (nobody) when the sandbox maps root elsewhere.
    """
    if not daemon.get("sandbox"):
        return list(command)
    return ["nsenter", "--target", str(daemon["pid"]), "--user", "--mount", "--", *command]


def cmd_exec(args: argparse.Namespace) -> int:
    """exec: run a command where the daemon's emulators are registered."""
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise CliError(ExitCode.USAGE, "exec needs a command: binfmtctl exec -- CMD [ARG...]")
    status = call(args.socket, "GET", "/v1/status", timeout=args.timeout)
    argv = exec_argv(status["daemon"], command)
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
    if not os.path.exists(DEFAULT_SOCKET) and os.path.exists(SANDBOX_SOCKET):
        return SANDBOX_SOCKET
    return DEFAULT_SOCKET


def _status_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="the raw status JSON")
    parser.add_argument("--offline", action="store_true", help="read binfmt_misc, not the daemon")
    parser.add_argument("--binfmt-misc", default="/proc/sys/fs/binfmt_misc", help="for --offline")


def _platforms_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="native and emulated, as JSON")
    parser.add_argument("--format", choices=["binfmt"], help="tonistiigi/binfmt's JSON shape")


def _verify_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("arches", nargs="*", metavar="ARCH", help="default: every configured one")
    _json_arg(parser)


def _arch_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("arch", metavar="ARCH")


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
    "exec": ("run CMD where the daemon's emulators are registered", _exec_args, cmd_exec, 10.0),
}


def build_parser() -> argparse.ArgumentParser:
    """Global options and the command name; the command's own options are parsed after."""
    listing = "\n".join(f"  {name:10s} {entry[0]}" for name, entry in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="binfmtctl",
        usage="binfmtctl [--socket PATH] [--timeout S] COMMAND [ARGS...]",
        description="Query and control binfmtd, the QEMU binfmt_misc registration daemon.",
        epilog=f"commands (binfmtctl COMMAND --help for more):\n{listing}\n\n"
        + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--socket",
        default=_default_socket(),
        metavar="PATH",
        help=f"binfmtd's API socket (default {DEFAULT_SOCKET}; env BINFMTD_SOCKET)",
    )
    parser.add_argument(
        "--timeout", type=float, metavar="S", help="seconds to wait (10; 300 for mutations)"
    )
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Both parsing stages; argparse's SystemExit (usage errors, --help) passes through."""
    args = build_parser().parse_args(argv)
    text, add_arguments, handler, wait = COMMANDS[args.command]
    sub = argparse.ArgumentParser(prog=f"binfmtctl {args.command}", description=text)
    add_arguments(sub)
    sub.set_defaults(func=handler, wait=wait)
    return sub.parse_args(args.rest, namespace=args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run binfmtctl; returns the exit code (see the module docstring)."""
    try:
        args = parse(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.timeout is None:
        args.timeout = args.wait
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"binfmtctl: {exc.message}", file=sys.stderr)
        return int(exc.code)
    except BrokenPipeError:
        return ExitCode.OK


if __name__ == "__main__":
    raise SystemExit(main())
