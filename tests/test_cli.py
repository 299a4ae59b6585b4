"""binfmtctl against a real ApiServer on a real Unix socket, with a fake daemon behind it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from binfmtd import cli, render, wire
from binfmtd.server import ApiServer
from binfmtd.wire import ApiError

REPO = Path(__file__).resolve().parent.parent
NOW = 1_700_000_000.0
SYSTEM_PYTHON = "/usr/bin/python3"  # stdlib only, and readable by nobody


def arch(name: str, state: str = "verified", **changes: Any) -> dict[str, Any]:
    """One arch entry of the status JSON."""
    entry: dict[str, Any] = {
        "arch": name,
        "platforms": [f"linux/{name}"],
        "state": state,
        "registered": True,
        "enabled": True,
        "flags": "POCF",
        "interpreter": f"/var/lib/binfmtd/qemu/qemu-{name}",
        "checksum": "blake3:" + "ab" * 32,
        "qemu_version": "8.2.2",
        "probe": {"ok": state == "verified", "at": NOW - 42, "duration_ms": 12.5, "error": None},
        "error": None,
        "working": state == "verified",
    }
    entry.update(changes)
    return entry


def status_doc(
    *arches: dict[str, Any], ready: bool = True, sandbox: bool = False
) -> dict[str, Any]:
    """A status document shaped like the daemon's."""
    return {
        "daemon": {
            "version": "0.1.0",
            "pid": 4242,
            "started_at": NOW - 3600,
            "sandbox": sandbox,
            "binfmt_misc": "/proc/sys/fs/binfmt_misc",
            "ready": ready,
            "last_reconcile": NOW - 3,
            "config": "/etc/binfmtd/binfmtd.yaml",
        },
        "arches": list(arches),
        "native": ["linux/amd64", "linux/386"],
        "worker": None,
    }


GOOD = status_doc(arch("aarch64", platforms=["linux/arm64"]), arch("riscv64"))
WORKER: dict[str, Any] = {
    "state": "running",
    "pid": 99,
    "restarts": 0,
    "intended_platforms": ["linux/amd64", "linux/arm64"],
    "differences": None,
    "buildx_command": "docker buildx create --name binfmtd --driver remote unix:///run/b.sock",
}


class FakeDaemon:
    """The Api, with a status document tests can swap."""

    def __init__(self) -> None:
        self.doc = GOOD
        self.ver = 1
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def version(self) -> int:
        return self.ver

    def set_status(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.ver += 1

    def status(self) -> dict[str, Any]:
        return self.doc

    def platforms(self) -> dict[str, Any]:
        emulated = ["linux/arm64", "linux/riscv64"]
        native = ["linux/amd64", "linux/386"]
        return {"platforms": native + emulated, "native": native, "emulated": emulated}

    def platforms_binfmt(self) -> dict[str, Any]:
        return {"supported": self.platforms()["platforms"], "emulators": ["qemu-aarch64"]}

    def health(self) -> dict[str, Any]:
        return {"ok": True, "ready": True, "last_tick_age_s": 0.2}

    def worker(self) -> dict[str, Any]:
        return WORKER

    def metrics(self) -> bytes:
        return b"binfmtd_up 1.0\n"

    def mutate(self, action: str, arg: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((str(action), arg))
        if arg.get("arch") == "sparc64":
            raise ApiError(404, "architecture 'sparc64' is not configured")
        if action == "verify":
            arches = arg.get("arches") or ["aarch64", "riscv64"]
            return {
                "verified": [a for a in arches if a != "mips"],
                "failed": ["mips"] * ("mips" in arches),
            }
        if action == "reconcile":
            return {"actions": ["register aarch64"], "errors": {}}
        if action == "reload":
            return {"reloaded": True, "changed": ["arches"]}
        return {"arch": arg["arch"], "state": "disabled" if action == "disable" else "verified"}


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short private directory under /tmp, traversable by anyone."""
    path = tempfile.mkdtemp(dir="/tmp", prefix="bc")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon() -> FakeDaemon:
    """The fake daemon behind the server."""
    return FakeDaemon()


@pytest.fixture
def sock(sockdir: str, daemon: FakeDaemon) -> Iterator[str]:
    """A running ApiServer's socket path (mode 0666 so the nobody tests can connect)."""
    with ApiServer(os.path.join(sockdir, "api.sock"), None, daemon, mode=0o666) as srv:
        yield srv.path


def run(sock: str, *argv: str) -> int:
    """main() with --socket."""
    return cli.main(["--socket", sock, *argv])


# --- pure rendering --------------------------------------------------------------------------


def test_status_page_is_an_aligned_table() -> None:
    """The human status page: a daemon line, native platforms, and aligned columns."""
    doc = status_doc(
        arch("aarch64", platforms=["linux/arm64"]),
        arch("arm", platforms=["linux/arm/v6", "linux/arm/v7"], probe=None, state="unverified"),
        arch(
            "riscv64",
            "failed",
            probe={"ok": False, "at": NOW - 600, "duration_ms": 3.0, "error": "exit 139"},
        ),
    )
    assert render.status_page(wire.StatusRecord.from_json(doc), NOW) == STATUS_PAGE


STATUS_PAGE = """\
binfmtd 0.1.0, pid 4242, ready, last reconcile 3s ago
config /etc/binfmtd/binfmtd.yaml, binfmt_misc /proc/sys/fs/binfmt_misc
native: linux/amd64, linux/386

ARCH     PLATFORMS                  STATE       FLAGS  INTERPRETER                         VERIFIED
aarch64  linux/arm64                verified    POCF   /var/lib/binfmtd/qemu/qemu-aarch64  42s ago (12.5 ms)
arm      linux/arm/v6,linux/arm/v7  unverified  POCF   /var/lib/binfmtd/qemu/qemu-arm      never
riscv64  linux/riscv64              failed      POCF   /var/lib/binfmtd/qemu/qemu-riscv64  failed 10m ago
arm: not verified (state unverified)
riscv64: not verified (state failed): exit 139"""  # noqa: E501


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(-5, "0s"), (0, "0s"), (59.9, "59s"), (60, "1m"), (3599, "59m"), (3600, "1h"), (90000, "1d")],
)
def test_age(seconds: float, text: str) -> None:
    """Ages are short and never negative."""
    assert render.age(seconds) == text


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        (arch("a"), None),
        (arch("a", registered=False, state="missing"), "not registered"),
        (arch("a", enabled=False, state="disabled"), "registered but disabled"),
        (
            arch(
                "a",
                enabled=False,
                state="disabled",
                probe={"ok": False, "at": NOW, "duration_ms": 1.0, "error": "probe exited 127"},
            ),
            "registered but disabled",
        ),
        (arch("a", flags="POC"), "registered without the F flag (flags POC)"),
        (
            arch("a", "foreign", error="owned by qemu-user-static"),
            "not verified (state foreign): owned by qemu-user-static",
        ),
    ],
)
def test_arch_problem(entry: dict[str, Any], problem: str | None) -> None:
    """Each way an arch falls short is named."""
    assert render.arch_problem(wire.ArchRecord.from_json(entry)) == problem


def test_exec_argv() -> None:
    """A sandboxed daemon is entered with nsenter (user + mount, root inside); others are not."""
    host, sandbox = wire.DaemonRecord("0.1.0", 7), wire.DaemonRecord("0.1.0", 7, sandbox=True)
    assert cli.exec_argv(host, ["make"], "/src") == ["make"]
    assert cli.exec_argv(sandbox, ["make", "-j"], "/src") == [
        *("nsenter", "--target", "7", "--user", "--mount", "--wd=/src", "--", "make", "-j")
    ]


# --- against the server ----------------------------------------------------------------------


def test_status_table(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`status` prints the header and one row per arch, exit 0."""
    assert run(sock, "status") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("binfmtd 0.1.0, pid 4242, ready")
    assert lines[4].split() == ["ARCH", "PLATFORMS", "STATE", "FLAGS", "INTERPRETER", "VERIFIED"]
    assert lines[5].split()[:4] == ["aarch64", "linux/arm64", "verified", "POCF"]
    assert len(lines) == 7


def test_status_json(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`status --json` prints the daemon's document unchanged."""
    assert run(sock, "status", "--json") == 0
    assert json.loads(capsys.readouterr().out) == GOOD


def test_platforms_exactly_comma_separated(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`platforms` prints one line ready for `buildx build --platform`."""
    assert run(sock, "platforms") == 0
    assert capsys.readouterr().out == "linux/amd64,linux/386,linux/arm64,linux/riscv64\n"


def test_platforms_json_and_binfmt(
    sock: str, daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """`platforms --json` and `--format binfmt` print the two JSON shapes."""
    assert run(sock, "platforms", "--json") == 0
    assert json.loads(capsys.readouterr().out) == daemon.platforms()
    assert run(sock, "platforms", "--format", "binfmt") == 0
    assert json.loads(capsys.readouterr().out) == daemon.platforms_binfmt()


def test_check_ok(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`check` exits 0 when every arch is registered with F and verified."""
    assert run(sock, "check") == 0
    assert capsys.readouterr().out.startswith("ok: 2 architectures")


def test_check_names_what_is_wrong(
    sock: str, daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check` exits 1 and prints one line per arch that falls short."""
    daemon.set_status(
        status_doc(arch("aarch64"), arch("s390x", flags="PO"), arch("ppc64le", "failed"))
    )
    assert run(sock, "check") == 1
    assert capsys.readouterr().out.splitlines() == [
        "s390x: registered without the F flag (flags PO)",
        "ppc64le: not verified (state failed)",
    ]


def test_check_fails_before_ready(
    sock: str, daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check` fails while the daemon has not finished its first pass."""
    daemon.set_status(status_doc(arch("aarch64"), ready=False))
    assert run(sock, "check") == 1
    assert "not ready" in capsys.readouterr().out


def test_verify(sock: str, daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    """`verify ARCH...` sends the names; any failure makes exit 1."""
    assert run(sock, "verify", "aarch64") == 0
    assert daemon.calls[-1] == ("verify", {"arches": ["aarch64"]})
    assert run(sock, "verify") == 0
    assert daemon.calls[-1] == ("verify", {})
    assert run(sock, "verify", "aarch64", "mips") == 1
    assert "mips: FAILED" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "call", "out"),
    [
        (["enable", "aarch64"], ("enable", {"arch": "aarch64"}), "aarch64: verified\n"),
        (["disable", "aarch64"], ("disable", {"arch": "aarch64"}), "aarch64: disabled\n"),
        (["reconcile"], ("reconcile", {}), "done: register aarch64\n"),
        (["reload"], ("reload", {}), "reloaded; changed: arches\n"),
    ],
)
def test_mutations(
    sock: str,
    daemon: FakeDaemon,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    call: tuple[str, dict[str, Any]],
    out: str,
) -> None:
    """Each mutating command reaches the daemon and says what happened."""
    assert run(sock, *argv) == 0
    assert daemon.calls == [call]
    assert capsys.readouterr().out == out


def test_worker(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`worker` shows the state and the buildx command."""
    assert run(sock, "worker") == 0
    out = capsys.readouterr().out
    assert out.startswith("worker: running (pid 99")
    assert out.rstrip().endswith(WORKER["buildx_command"])


def test_daemon_error_is_exit_5(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An error answer from the daemon is exit 5 with its message."""
    assert run(sock, "enable", "sparc64") == 5
    assert "architecture 'sparc64' is not configured (HTTP 404)" in capsys.readouterr().err


def test_bad_arch_is_refused_by_the_server(sock: str, daemon: FakeDaemon) -> None:
    """An invalid arch name is refused (exit 5) without reaching the daemon."""
    assert run(sock, "enable", "../x") == 5
    assert daemon.calls == []


def test_daemon_down_is_exit_3(sockdir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """No socket: exit 3 and a message that says how to start the daemon."""
    path = os.path.join(sockdir, "none.sock")
    assert run(path, "status") == 3
    assert capsys.readouterr().err == (
        f"binfmtctl: binfmtd is not running (no socket at {path}); "
        "start it with `systemctl start binfmtd`\n"
    )


def test_socket_path_too_long_is_named(sockdir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A --socket path longer than a Unix socket can hold: exit 3, saying so (not "None")."""
    path = os.path.join(sockdir, "x" * 120 + ".sock")
    assert run(path, "status") == 3
    size = len(path.encode())
    assert capsys.readouterr().err == (
        f"binfmtctl: socket path too long for a Unix socket ({size} bytes, at most 107): "
        f"{path}; give a shorter path with --socket (or BINFMTD_SOCKET)\n"
    )


def test_stale_socket_is_exit_3(sockdir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A socket file nobody listens on: exit 3, connection refused."""
    path = os.path.join(sockdir, "stale.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(path)
    assert run(path, "platforms") == 3
    assert "connection refused" in capsys.readouterr().err


def test_usage_errors_are_exit_64_with_the_usage_line(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown command or option, or exec without a command: exit 64 (EX_USAGE), usage."""
    assert cli.main(["frobnicate"]) == 64
    err = capsys.readouterr().err
    assert err.startswith("usage: binfmtctl ") and "unknown command 'frobnicate'" in err
    assert cli.main(["status", "--bogus"]) == 64
    err = capsys.readouterr().err
    assert err.startswith("usage: binfmtctl status") and "--bogus" in err
    assert cli.main(["stauts"]) == 64
    assert "did you mean status" in capsys.readouterr().err
    assert cli.main(["--socket", "/nonexistent", "exec", "--"]) == 64
    assert "exec needs a command" in capsys.readouterr().err


def test_bare_binfmtctl_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    """No arguments: the full help (commands, exit codes) on stderr, exit 64; no internal names."""
    assert cli.main([]) == 64
    err = capsys.readouterr().err
    assert err.startswith("usage: binfmtctl ")
    assert all(f"\n  {name} " in err for name in cli.COMMANDS)
    assert "rest" not in err.split() and "required" not in err


def test_env_sets_default_socket(sock: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """BINFMTD_SOCKET replaces the default socket path."""
    monkeypatch.setenv("BINFMTD_SOCKET", sock)
    assert cli.main(["check"]) == 0


def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    """--help lists every exit code."""
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for code in (
        "0  ok",
        "1  check failed",
        "64  usage",
        "141  stdout was closed",
        "3  binfmtd is not reachable",
        "4  permission",
        "5  binfmtd answered",
    ):
        assert code in out


def test_offline_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`status --offline` lists binfmt_misc entries and calls them unverified."""
    (tmp_path / "register").write_text("")
    (tmp_path / "status").write_text("enabled\n")
    (tmp_path / "qemu-aarch64").write_text(
        "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: POCF\noffset 0\n"
        "magic 7f454c460201010000000000000000000200b700\n"
        "mask ffffffffffffff00fffffffffffffffffeffffff\n"
    )
    (tmp_path / "qemu-arm").write_text("disabled\ninterpreter /usr/bin/qemu-arm\nflags: \n")
    assert cli.main(["status", "--offline", "--binfmt-misc", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ENTRY", "ENABLED", "FLAGS", "INTERPRETER", "STATE"]
    assert lines[1].split() == [
        "qemu-aarch64",
        "enabled",
        "POCF",
        "/usr/libexec/qemu-binfmt/aarch64-binfmt-P",
        "unverified",
    ]
    assert lines[2].split() == ["qemu-arm", "disabled", "-", "/usr/bin/qemu-arm", "unverified"]
    assert "no probe ran" in lines[-1]


def test_offline_without_binfmt_misc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`status --offline` on a missing directory asks whether binfmt_misc is mounted."""
    assert cli.main(["status", "--offline", "--binfmt-misc", str(tmp_path / "none")]) == 3
    assert "is binfmt_misc mounted?" in capsys.readouterr().err


# --- as a separate process -------------------------------------------------------------------


def binfmtctl(*argv: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m binfmtd.cli` with the system python (it needs only the stdlib)."""
    return subprocess.run(
        [SYSTEM_PYTHON, "-m", "binfmtd.cli", *argv],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO)},
        user=user,
        group=user,
        extra_groups=[] if user is not None else None,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_module_entry_point(sock: str) -> None:
    """`python -m binfmtd.cli platforms` works and imports nothing outside the stdlib."""
    done = binfmtctl("--socket", sock, "platforms")
    assert (done.returncode, done.stdout) == (
        0,
        "linux/amd64,linux/386,linux/arm64,linux/riscv64\n",
    )
    heavy = (
        *("binfmtd", "http", "yaml", "structlog", "psutil", "grpc", "typing", "dataclasses"),
        *("inspect", "h11", "prometheus_client"),
    )
    probe = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); import binfmtd.cli; "
        f"print(sorted(m for m in sys.modules if m.startswith({heavy})))"
    )
    imported = subprocess.run(  # -S: no site, so only what binfmtd.cli pulls in shows
        [SYSTEM_PYTHON, "-S", "-c", probe],
        capture_output=True,
        text=True,
        check=True,
    )
    assert imported.stdout.strip() == (
        "['binfmtd', 'binfmtd.cli', 'binfmtd.render', 'binfmtd.wire']"
    )


def test_forbidden_mutation_is_exit_4(sock: str, daemon: FakeDaemon) -> None:
    """A non-root user may read but a mutation is refused: 403, exit 4."""
    assert binfmtctl("--socket", sock, "check", user=65534).returncode == 0
    done = binfmtctl("--socket", sock, "reconcile", user=65534)
    assert done.returncode == 4
    assert "reconcile needs root; peer uid is 65534 (HTTP 403)" in done.stderr
    assert daemon.calls == []


def test_socket_permission_is_exit_4(sockdir: str, daemon: FakeDaemon) -> None:
    """A user who may not open the socket gets exit 4 and a hint about the group."""
    with ApiServer(os.path.join(sockdir, "api.sock"), None, daemon) as srv:
        done = binfmtctl("--socket", srv.path, "status", user=65534)
    assert done.returncode == 4
    assert "permission denied" in done.stderr
    assert "group" in done.stderr


def test_exec_without_sandbox_runs_the_command(sock: str) -> None:
    """`exec` against a host daemon runs the command as it is."""
    done = binfmtctl("--socket", sock, "exec", "--", "echo", "hello")
    assert (done.returncode, done.stdout) == (0, "hello\n")


def test_exec_enters_the_sandbox_namespaces(sock: str, daemon: FakeDaemon) -> None:
    """`exec` against a --sandbox daemon runs the command in its user+mount namespaces, as root."""
    holder = subprocess.Popen(["unshare", "--user", "--map-root-user", "--mount", "sleep", "30"])
    try:
        deadline = time.monotonic() + 5
        target = f"/proc/{holder.pid}/ns/user"
        while (
            os.readlink(target) == os.readlink("/proc/self/ns/user") and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        daemon.set_status(
            {**GOOD, "daemon": {**GOOD["daemon"], "pid": holder.pid, "sandbox": True}}
        )
        done = binfmtctl(
            "--socket", sock, "exec", "--", "sh", "-c", "readlink /proc/self/ns/user; id -u"
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [os.readlink(target), "0"]
    finally:
        holder.kill()
        holder.wait()


def test_verify_json(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`verify --json` prints the daemon's answer as JSON."""
    assert run(sock, "verify", "--json", "aarch64") == 0
    assert json.loads(capsys.readouterr().out.split("\naarch64: verified")[0]) == {
        "verified": ["aarch64"],
        "failed": [],
    }


def test_exec_passes_options_through(sock: str) -> None:
    """Options after `exec --` belong to the command, not to binfmtctl."""
    done = binfmtctl("--socket", sock, "exec", "--", "sh", "-c", "echo $0", "--help")
    assert (done.returncode, done.stdout) == (0, "--help\n")


def test_command_help(capsys: pytest.CaptureFixture[str]) -> None:
    """Each command has its own --help, and the top-level help lists the commands."""
    assert cli.main(["status", "--help"]) == 0
    assert "--offline" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n  {name} " in out for name in cli.COMMANDS)


# --- issue 13: names, pipes, cwd, offline ----------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "call"),
    [
        (["enable", "arm64"], ("enable", {"arch": "aarch64"})),
        (["disable", "linux/arm/v7"], ("disable", {"arch": "arm"})),
        (["verify", "amd64", "linux/riscv64"], ("verify", {"arches": ["x86_64", "riscv64"]})),
    ],
)
def test_docker_names_reach_the_daemon_as_qemu_names(
    sock: str, daemon: FakeDaemon, argv: list[str], call: tuple[str, dict[str, Any]]
) -> None:
    """`enable arm64`, `disable linux/arm/v7`, `verify amd64`: Docker names just work."""
    run(sock, *argv)
    assert daemon.calls == [call]


def test_unknown_name_says_did_you_mean(
    sock: str, daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """`enable arn64`: exit 5, and the message names arm64 (aarch64)."""
    assert run(sock, "enable", "arn64") == 5
    assert "did you mean arm64 (aarch64)" in capsys.readouterr().err
    assert daemon.calls == []


CLOSED_PIPE = """
import os, sys
sys.path.insert(0, sys.argv[1])
read, write = os.pipe()
os.close(read)
os.dup2(write, 1)
from binfmtd import cli
raise SystemExit(cli.main(sys.argv[2:]))
"""


def test_closed_stdout_ends_quietly(sock: str) -> None:
    """`binfmtctl status | head -0`: exit 141, no traceback, nothing on stderr."""
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", CLOSED_PIPE, str(REPO), "--socket", sock, "status"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stderr) == (141, "")


def test_exec_keeps_the_callers_directory(sock: str, tmp_path: Path) -> None:
    """`exec` runs the command in the caller's working directory (relative paths work)."""
    (tmp_path / "hello.sh").write_text("echo hello from $(pwd)\n")
    done = subprocess.run(
        [SYSTEM_PYTHON, "-m", "binfmtd.cli", "--socket", sock, "exec", "--", "sh", "hello.sh"],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, f"hello from {tmp_path}\n"), done.stderr


def test_offline_says_binfmt_misc_is_not_mounted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty directory (binfmt_misc not mounted there) is named as such, not "0 entries"."""
    assert cli.main(["status", "--offline", "--binfmt-misc", str(tmp_path)]) == 3
    captured = capsys.readouterr()
    assert "binfmt_misc is not mounted at" in captured.err
    assert f"mount -t binfmt_misc binfmt_misc {tmp_path}" in captured.err
    assert "0 entries" not in captured.out


# --- new-user trial defects ------------------------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "-inf", "1e308", "86401", "soon"])
def test_bad_timeout_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--timeout -1/0/nan/inf/1e308`: exit 64 with the usage line, never a traceback."""
    assert cli.main(["--socket", "/nonexistent", "--timeout", value, "status"]) == 64
    err = capsys.readouterr().err
    assert err.startswith("usage: binfmtctl ") and "--timeout" in err
    assert "Traceback" not in err


def test_good_timeout_is_accepted(sock: str) -> None:
    """A finite timeout in range works, fractions too."""
    assert cli.main(["--socket", sock, "--timeout", "0.5", "check"]) == 0
    assert cli.main(["--socket", sock, "--timeout", "86400", "check"]) == 0


def test_verify_of_a_disabled_arch_is_exit_1(
    sock: str, daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """`disable arm64; verify arm64`: the named arch was not verified, so exit 1 (as --help says);
    a bare `verify` with an operator-disabled arch stays 0 (the operator chose it)."""
    answer = {"verified": ["riscv64"], "failed": [], "disabled": ["aarch64"]}
    daemon.mutate = lambda action, arg: answer  # type: ignore[method-assign]
    assert run(sock, "verify", "arm64") == 1
    assert "aarch64: disabled by the operator (not probed)" in capsys.readouterr().out
    assert run(sock, "verify") == 0


def test_check_names_operator_disabled_arches(
    sock: str, daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check` does not claim an operator-disabled arch is registered and verified."""
    daemon.set_status(
        status_doc(arch("aarch64"), arch("mips64el", "operator-disabled", enabled=False))
    )
    assert run(sock, "check") == 0
    assert capsys.readouterr().out == ("ok: 1 verified, 1 disabled by the operator (mips64el)\n")


def test_two_sandbox_daemons_are_named_not_systemctl(
    sockdir: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No system socket but two --sandbox daemons: name their sockets and the --socket line."""
    for name in ("a", "b"):
        os.makedirs(os.path.join(sockdir, name))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(os.path.join(sockdir, name, "binfmtd.sock"))
    monkeypatch.setattr(cli, "DEFAULT_SOCKET", os.path.join(sockdir, "none.sock"))
    monkeypatch.setattr(cli, "SANDBOX_SOCKETS", os.path.join(sockdir, "*", "binfmtd.sock"))
    monkeypatch.delenv("BINFMTD_SOCKET", raising=False)
    assert cli.main(["status"]) == 3
    err = capsys.readouterr().err
    assert "systemctl" not in err
    for name in ("a", "b"):
        assert f"binfmtctl --socket {sockdir}/{name}/binfmtd.sock ..." in err


def test_hints_name_a_sandbox_daemon_not_systemd(
    sock: str, daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """Talking to a --sandbox daemon, hints name its config and `binfmtctl reload` /
    `binfmtd --sandbox=NAME`, never systemctl or /etc."""
    doc = status_doc(arch("aarch64"), sandbox=True)
    doc["daemon"].update(config="/srv/e.yaml", sandbox_name="a")
    daemon.set_status(doc)
    daemon.worker = lambda: {"enabled": False}  # type: ignore[method-assign]
    assert run(sock, "worker") == 0
    out = capsys.readouterr().out
    assert "/srv/e.yaml" in out and "binfmtctl reload" in out
    assert "systemctl" not in out and "/etc/" not in out
    answer = {"reloaded": True, "changed": [], "needs_restart": ["api.socket"]}
    daemon.mutate = lambda action, arg: answer  # type: ignore[method-assign]
    assert run(sock, "reload") == 0
    out = capsys.readouterr().out
    assert "binfmtd --sandbox=a --config /srv/e.yaml" in out and "systemctl" not in out


def test_hints_name_systemd_for_the_system_daemon(
    sock: str, daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """The system daemon's hints keep naming its unit and its configuration file."""
    daemon.worker = lambda: {"enabled": False}  # type: ignore[method-assign]
    assert run(sock, "worker") == 0
    out = capsys.readouterr().out
    assert "(/etc/binfmtd/binfmtd.yaml)" in out and "systemctl reload binfmtd" in out
    answer = {"reloaded": True, "changed": [], "needs_restart": ["api.socket"]}
    daemon.mutate = lambda action, arg: answer  # type: ignore[method-assign]
    assert run(sock, "reload") == 0
    assert "(systemctl restart binfmtd)" in capsys.readouterr().out
