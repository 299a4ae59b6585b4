"""Issue 11: no local user can turn the root daemon against root.

Each test plays the unprivileged local user (a real account made for the test) against a real
daemon in a private binfmt_misc instance, with real QEMU and real foreign binaries.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import daemonutil as du
import pytest
import yaml
from conftest import LocalUser, daemon_config, write_config
from daemonutil import SandboxSh

from binfmtd import arch as archmod
from binfmtd import config as configmod
from binfmtd import service
from binfmtd.binfmt import FormatError, Registration, parse_entry
from binfmtd.preflight import Exit
from binfmtd.probe import PROBE_DIR
from binfmtd.wire import ApiError

SECRET = b"root's secret\n"


@pytest.fixture
def lab() -> Iterator[Path]:
    """A root-owned 0755 directory under /tmp that the test user can traverse (tmp_path is not)."""
    path = Path(tempfile.mkdtemp(prefix="binfmtd-sec-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _setuid_attack(
    daemon: du.Daemon, user: LocalUser, lab: Path, busybox: Callable[[str], Path]
) -> tuple[bytes, str]:
    """As `user`: run a setuid-root arm64 binary asking QEMU to log into a root-only file."""
    suid = lab / "su-arm64"
    shutil.copyfile(busybox("arm64"), suid)
    suid.chmod(0o4755)
    secret = lab / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    done = daemon.ns(
        f"setpriv --reuid {user.uid} --regid {user.gid} --clear-groups "
        f"env -i QEMU_STRACE=1 QEMU_LOG_FILENAME={secret} {suid} true 2>&1"
    )
    return secret.read_bytes(), done.stdout


def test_default_flags_deny_setuid_foreign_binaries_root(
    tmp_path: Path,
    sock: str,
    lab: Path,
    local_user: LocalUser,
    busybox: Callable[[str], Path],
) -> None:
    """Default flags (POF): a user's setuid arm64 binary + QEMU_LOG_FILENAME cannot write root's."""
    cfg = daemon_config(tmp_path, arches=["aarch64"], api={"socket": sock, "group": None})
    with du.running(cfg, sock, mode="compose") as daemon:
        row = daemon.wait_verified(["aarch64"])["aarch64"]
        content, output = _setuid_attack(daemon, local_user, lab, busybox)
        assert content == SECRET, f"a local user rewrote a root-only file through QEMU: {output}"
        assert row["flags"] == "POF"
        assert daemon.status().get("warnings") == []
        assert not daemon.events("credentials_flag_set")


def test_explicit_c_flag_works_and_is_warned_about(
    tmp_path: Path,
    sock: str,
    lab: Path,
    local_user: LocalUser,
    busybox: Callable[[str], Path],
) -> None:
    """flags: POCF is honoured (setuid runs as root: the hole) and warned in log and status."""
    cfg = daemon_config(
        tmp_path, arches=["aarch64"], flags="POCF", api={"socket": sock, "group": None}
    )
    with du.running(cfg, sock, mode="compose") as daemon:
        assert daemon.wait_verified(["aarch64"])["aarch64"]["flags"] == "POCF"
        warnings = daemon.status()["warnings"]
        shown = daemon.ctl("status").stdout
        content, _ = _setuid_attack(daemon, local_user, lab, busybox)
        events = daemon.events("credentials_flag_set")
    assert content != SECRET  # what C costs: the reason it is no longer the default
    assert len(warnings) == 1 and "qemu-aarch64" in warnings[0] and "C flag" in warnings[0]
    assert f"warning: {warnings[0]}" in shown
    (event,) = events
    assert event["entries"] == ["qemu-aarch64"] and event["level"] == "warning"


def _state_from_before(tmp_path: Path) -> None:
    """A state file as binfmtd <= 0.x wrote it: no record of the flags it registered with."""
    state = tmp_path / "state" / "state.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"version": 1, "emulators": {}}), encoding="utf-8")


@pytest.mark.parametrize("evidence", ["entry", "state_file"])
def test_upgrade_from_the_old_c_default_is_logged(
    tmp_path: Path, sock: str, evidence: str, qemu_dir: Path
) -> None:
    """An install that relied on the old FPC default gets one clear log line when upgraded."""
    cfg = daemon_config(tmp_path, arches=["aarch64"], api={"socket": sock, "group": None})
    before = ""
    if evidence == "entry":  # an older binfmtd's entry, still registered
        interpreter = tmp_path / "qemu" / "qemu-aarch64"
        interpreter.parent.mkdir()
        shutil.copyfile(qemu_dir / "qemu-aarch64-static", interpreter)
        interpreter.chmod(0o755)
        before = f"printf '%s' '{_old_entry(str(interpreter))}' > {du.ENTRIES}/register"
    else:
        _state_from_before(tmp_path)
    with du.running(cfg, sock, mode="compose", before=before) as daemon:
        assert daemon.wait_verified(["aarch64"])["aarch64"]["flags"] == "POF"
        (event,) = daemon.events("flags_default_changed")
    assert event["level"] == "warning"
    assert "flags: POCF" in event["hint"]
    assert event["entries"] == (["qemu-aarch64"] if evidence == "entry" else [])


def _old_entry(interpreter: str) -> str:
    row = archmod.BY_NAME["aarch64"]
    return Registration(row.entry_name, row.magic, row.mask, interpreter, "POCF").register_string()


# ---------------------------------------------------------------- item 8: control characters

CONTROL = ["\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x1f", "\t", "\x7f"]


@pytest.mark.parametrize("char", CONTROL, ids=[f"{ord(c):02x}" for c in CONTROL])
def test_control_characters_in_install_dir_are_config_errors(tmp_path: Path, char: str) -> None:
    """install_dir with a control character: exit 78 naming it, before any kernel call."""
    install = tmp_path / f"q{char}dir"
    cfg = write_config(tmp_path, arches=["s390x"], install_dir=str(install))
    result = du.run([*du.sandbox_argv(cfg), "--oneshot"], 60)
    assert result.returncode == Exit.CONFIG, result.stderr
    assert "install_dir: contains control characters" in result.stderr
    assert not install.exists()


@pytest.mark.parametrize(
    "key", ["state_file", "lock_file", "api.socket", "source.path", "buildkit.base_config"]
)
def test_control_characters_rejected_in_every_path(key: str) -> None:
    """Every configured path or name refuses control characters, naming its key."""
    section, _, leaf = key.rpartition(".")
    value = "/srv/x\x1cy"
    inner: dict[str, str] = {leaf: value, **({"kind": "directory"} if section == "source" else {})}
    doc: dict[str, object] = {section: inner} if section else {leaf: value}
    with pytest.raises(configmod.ConfigError, match=f"{key}: contains control characters"):
        configmod.parse(yaml.safe_dump(doc))


@pytest.mark.parametrize("char", CONTROL, ids=[f"{ord(c):02x}" for c in CONTROL])
def test_register_string_refuses_control_characters(char: str) -> None:
    """A register string never carries a control character in its interpreter or name."""
    row = archmod.BY_NAME["s390x"]
    with pytest.raises(FormatError, match="control characters"):
        Registration(row.entry_name, row.magic, row.mask, f"/srv/q{char}/qemu-s390x", "POF")
    with pytest.raises(FormatError, match="invalid binfmt_misc entry name"):
        Registration(f"qemu-s390x{char}", row.magic, row.mask, "/srv/qemu-s390x", "POF")


def test_another_tools_entry_with_control_characters_is_read_exactly(
    sandbox_sh: SandboxSh, tmp_path: Path, qemu_dir: Path
) -> None:
    """An entry the kernel shows with \\x1c/\\r in its interpreter parses to that exact path."""
    odd = tmp_path / "odd\x1cdir\rx"
    odd.mkdir()
    shutil.copyfile(qemu_dir / "qemu-s390x-static", odd / "qemu-s390x")
    (odd / "qemu-s390x").chmod(0o755)
    row = archmod.BY_NAME["s390x"]
    magic = "".join(f"\\x{b:02x}" for b in row.magic)
    mask = "".join(f"\\x{b:02x}" for b in row.mask)
    out = tmp_path / "entry"
    done = sandbox_sh(
        f"printf '%s' ':other-s390x:M:0:{magic}:{mask}:'\"$ODD\"':F' > {du.ENTRIES}/register\n"
        f"cat {du.ENTRIES}/other-s390x > {out}\n",
        env={"ODD": str(odd / "qemu-s390x")},
    )
    assert done.returncode == 0, done.stderr
    entry = parse_entry("other-s390x", out.read_bytes().decode("latin-1"))
    assert entry.interpreter == str(odd / "qemu-s390x")
    assert entry.flags == "F" and entry.enabled


# ---------------------------------------------------------------- item 2b: probe roots


def test_probe_roots_in_a_shared_state_directory_are_refused(
    tmp_path: Path, sock: str, lab: Path, local_user: LocalUser
) -> None:
    """state_file in a world-writable directory: a user's own probe-roots is never used."""
    shared = lab / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    cfg = daemon_config(
        tmp_path,
        arches=["s390x"],
        state_file=str(shared / "state.json"),
        api={"socket": sock, "group": None},
    )
    takeover = (
        f"cd {shared} && {{ [ ! -e probe-roots ] || mv probe-roots old-roots; }} && "
        "mkdir -m 0777 probe-roots"
    )
    with du.running(cfg, sock) as daemon:
        done = local_user.run(["sh", "-c", takeover])
        assert done.returncode == 0, done.stderr
        assert daemon.post("/v1/verify")[0] in (200, 422)
        row = daemon.arch("s390x")
        events = daemon.events("probe_failed")
    assert row["state"] != "verified"
    assert f"{shared} is writable by a non-root user" in (row["error"] or "")
    assert f"chown root: {shared} && chmod go-w {shared}" in row["error"]
    assert events and "probe roots refused" in events[-1]["error"]
    assert os.listdir(shared / "probe-roots") == []


def test_probe_roots_dir_made_by_someone_else_is_not_adopted(
    tmp_path: Path, sock: str, lab: Path, local_user: LocalUser
) -> None:
    """In a sticky shared directory, a probe-roots a user made first is never used."""
    shared = lab / "sticky"
    shared.mkdir()
    shared.chmod(0o1777)
    done = local_user.run(["mkdir", "-m", "0777", str(shared / "probe-roots")])
    assert done.returncode == 0, done.stderr
    cfg = daemon_config(
        tmp_path,
        arches=["s390x"],
        state_file=str(shared / "state.json"),
        api={"socket": sock, "group": None},
    )
    with du.running(cfg, sock) as daemon:
        daemon.wait_verified(["s390x"])
        st = (shared / "probe-roots").stat()
        taken = local_user.run(["mv", str(shared / "probe-roots"), str(shared / "mine")])
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o700)
    assert taken.returncode != 0  # and, sticky, the user cannot move root's away


def test_the_probe_stage_is_root_only_and_a_changed_probe_is_never_run(
    tmp_path: Path, sock: str
) -> None:
    """The probes run from a 0700 stage beside the state file that holds nothing but them. A
    probe changed behind binfmtd's back is written afresh before it runs again, a stranger file
    in the stage has the stage made anew, and stopping removes it."""
    cfg = daemon_config(tmp_path, arches=["s390x"], api={"socket": sock, "group": None})
    workdir = tmp_path / "state" / "probe-roots"
    with du.running(cfg, sock) as daemon:
        daemon.wait_verified(["s390x"])
        (stage,) = workdir.iterdir()
        for path in (workdir, stage):
            st = path.stat()
            assert (st.st_uid, st.st_mode & 0o777) == (0, 0o700), path
        assert os.listdir(stage) == ["s390x"]
        original = (stage / "s390x").read_bytes()
        # Another arch's probe written in place: run as it is, it would print the wrong message.
        (stage / "s390x").write_bytes((PROBE_DIR / "aarch64").read_bytes())
        assert daemon.post("/v1/verify")[0] == 200
        assert daemon.arch("s390x")["state"] == "verified"
        assert (stage / "s390x").read_bytes() == original
        (stage / "qemu-s390x-static").write_bytes(b"#!/bin/sh\n")
        assert daemon.post("/v1/verify")[0] == 200
        assert daemon.arch("s390x")["state"] == "verified"
        assert not stage.exists()
        (again,) = workdir.iterdir()
        assert os.listdir(again) == ["s390x"]
        (warned,) = daemon.events("probe_stage_remade")
        assert "holds files binfmtd did not make (qemu-s390x-static)" in warned["error"]
    assert os.listdir(workdir) == []


# ---------------------------------------------------------------- item 6: stop and reload


@pytest.fixture(scope="module")
def hanging_qemu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A static x86_64 "emulator" that hangs (test_faults' misbehaving QEMU, built with gcc)."""
    from test_faults import FAKE_QEMU

    work = tmp_path_factory.mktemp("hangqemu")
    (work / "fake.c").write_text(FAKE_QEMU, encoding="utf-8")
    out = work / "hang"
    built = du.run(["gcc", "-static", "-O2", "-DHANG", "-o", str(out), str(work / "fake.c")], 120)
    assert built.returncode == 0, built.stderr
    return out


def _probe_pids(interpreter: Path) -> list[int]:
    """Processes running `interpreter` as a probe (its `--version` runs do not count)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if exe == str(interpreter) and b"--version" not in argv:
            found.append(int(pid))
    return found


def _probing(interpreter: Path) -> bool:
    """Whether a probe runs `interpreter` now."""
    return bool(_probe_pids(interpreter))


def test_sigterm_mid_tick_ends_the_daemon_promptly(
    tmp_path: Path, sock: str, hanging_qemu: Path, qemu_dir: Path
) -> None:
    """SIGTERM while a tick waits on a probe (60 s timeout), a root mutation pending: the
    daemon exits 0 at once and the mutation is refused (503), never left hanging."""
    source = tmp_path / "source"
    source.mkdir()
    shutil.copyfile(qemu_dir / "qemu-aarch64-static", source / "qemu-aarch64-static")
    cfg = daemon_config(
        tmp_path,
        arches=["aarch64"],
        source={"kind": "directory", "path": str(source)},
        probe={"timeout_s": 60.0, "parallelism": 1},
        api={"socket": sock, "group": None},
    )
    daemon = du.start(cfg, sock)
    answers: list[Any] = []
    try:
        daemon.wait_verified(["aarch64"])
        # A source upgrade to an emulator that hangs: the next tick installs it and probes.
        shutil.copyfile(hanging_qemu, source / ".new")
        (source / ".new").rename(source / "qemu-aarch64-static")
        du.wait_until("the hanging probe", lambda: _probing(tmp_path / "qemu" / "qemu-aarch64"), 30)
        poster = threading.Thread(target=lambda: answers.append(_post(sock, "/v1/reconcile")))
        poster.start()
        du.wait_until("the request to be sent", lambda: _client_connected(sock), 10, 0.01)
        daemon.signal(signal.SIGTERM)
        # Before: the tick waited out its probe (60 s), then the request 120 s more.
        code = daemon.proc.wait(20)
        poster.join(30)
        orphans = _probe_pids(tmp_path / "qemu" / "qemu-aarch64")
    finally:
        if daemon.proc.poll() is None:
            daemon.kill()
        for pid in _probe_pids(tmp_path / "qemu" / "qemu-aarch64"):  # orphans of a failed run
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(daemon.work, ignore_errors=True)
    assert code == 0
    assert orphans == []  # the hanging probe was killed with the runner that started it
    assert len(answers) == 1, answers
    status, body = answers[0]
    # Queued, it is answered 503; still being read when the socket closed, the connection
    # closes without an answer (like a refused connection). It never waits.
    assert status in (503, -1), answers
    if status == 503:
        assert "reconcile was not run: binfmtd is stopping" in body["error"]


def test_stop_refuses_queued_and_later_mutations(tmp_path: Path) -> None:
    """At stop every queued mutation is answered 503 unrun, and any later one at once."""
    cfg = configmod.load(str(write_config(tmp_path, arches=["s390x"])))
    daemon = service.Daemon(cfg, sandbox=None, config_path=None)
    # This Daemon runs in the host's namespaces: no command may reach the kernel, so the
    # executor is replaced by a recorder (it must stay unused anyway).
    executed: list[str] = []

    def record(action: str, arg: dict[str, Any]) -> Any:
        executed.append(action)
        return {}

    daemon._execute = record  # type: ignore[method-assign]
    outcomes: list[tuple[int, str]] = []

    def client() -> None:
        try:
            daemon.submit("reconcile", {})
        except ApiError as exc:
            outcomes.append((exc.status, exc.message))

    waiting = threading.Thread(target=client)
    waiting.start()
    du.wait_until("the mutation to be queued", lambda: daemon.commands.qsize() == 1, 10)
    daemon.stopping = True  # what SIGTERM's handler does
    daemon._run_commands()  # the loop takes no more commands once stopping
    assert daemon.commands.qsize() == 1
    assert daemon._refuse_queued() == ["reconcile"]
    waiting.join(5)
    client()
    refused = (503, "reconcile was not run: binfmtd is stopping")
    assert outcomes == [refused, refused]
    assert executed == []


def _post(sock: str, target: str) -> tuple[int, Any]:
    try:
        answer = du.http(sock, "POST", target, timeout=60)
    except (OSError, AssertionError) as exc:
        return -1, {"error": f"no answer: {exc!r}"}
    return answer.status, answer.json()


def _client_connected(sock: str) -> bool:
    """Whether the daemon accepted a client on `sock` (/proc/net/unix shows the bound name,
    a temp name in the socket's directory that was then renamed)."""
    where = os.path.dirname(sock) + "/"
    with open("/proc/net/unix", encoding="ascii", errors="replace") as handle:
        return sum(1 for line in handle if where in line) >= 2


def test_reload_names_keys_that_need_a_restart(tmp_path: Path, sock: str) -> None:
    """reload applies arches, names lock_file and api as needing a restart, and keeps both."""
    body: dict[str, Any] = {"arches": ["s390x"], "api": {"socket": sock, "group": None}}
    cfg = daemon_config(tmp_path, **body)
    other_sock = os.path.join(os.path.dirname(sock), "other.sock")
    with du.running(cfg, sock) as daemon:
        daemon.wait_verified(["s390x"])
        daemon_config(
            tmp_path,
            arches=["s390x", "aarch64"],
            lock_file=str(tmp_path / "run" / "other.lock"),
            api={"socket": other_sock, "group": None},
        )
        code, answer = daemon.post("/v1/reload")
        shown = daemon.ctl("reload").stdout
        daemon.wait_verified(["s390x", "aarch64"])
        second = du.run(du.sandbox_argv(cfg), 60)  # the new config: another lock file
        still = daemon.status()["daemon"]["pid"]
        events = daemon.events("config_needs_restart")
    assert code == 200
    assert (answer["changed"], answer["needs_restart"]) == (["arches"], ["lock_file", "api"])
    # In --sandbox, binfmtctl names how to restart that sandbox (not systemctl).
    assert "not applied, need a restart (stop it (kill " in shown
    assert shown.rstrip().endswith("again): lock_file, api")
    assert not os.path.exists(other_sock)
    assert second.returncode == Exit.ALREADY_RUNNING, second.stderr
    assert f"another binfmtd works on {tmp_path / 'qemu'}" in second.stderr
    assert still == daemon.pid
    assert events and events[0]["keys"] == ["lock_file", "api"]


@pytest.mark.parametrize("flags", ["POF", "POCF"])
def test_oneshot_warns_while_an_entry_carries_c(
    sandbox_sh: SandboxSh, tmp_path: Path, flags: str
) -> None:
    """--oneshot prints the C warning on stderr exactly when an entry carries C."""
    cfg = write_config(tmp_path, arches=["s390x"], flags=flags)
    run = du.run_oneshot(sandbox_sh, tmp_path, cfg)
    assert run["rc"] == 0, run["stderr"]
    warned = "binfmtd: warning: entry qemu-s390x has the C flag" in run["stderr"]
    assert warned == ("C" in flags), run["stderr"]


@pytest.mark.parametrize("unsafe", ["chmod 666", "chown 1000"])
def test_reload_refuses_a_config_others_can_write(tmp_path: Path, sock: str, unsafe: str) -> None:
    """Reload (binfmtctl and SIGHUP) reads through the start's trust rule: refused, old kept."""
    body: dict[str, Any] = {"arches": ["s390x"], "api": {"socket": sock, "group": None}}
    cfg = daemon_config(tmp_path, **body)
    # From the host's root (not in an outer namespace): the start applies the trust rule.
    with du.running(cfg, sock, outer=False) as daemon:
        daemon.wait_verified(["s390x"])
        daemon_config(tmp_path, reconcile_interval_s=0.3, **body)
        if unsafe == "chmod 666":
            cfg.chmod(0o666)
        else:
            os.chown(cfg, 1000, -1)
        refused = daemon.ctl("reload")
        daemon.signal(signal.SIGHUP)
        du.wait_until("SIGHUP reload refused", lambda: len(daemon.events("reload_failed")) >= 2, 30)
        os.chown(cfg, 0, -1)
        cfg.chmod(0o644)
        accepted = daemon.ctl("reload")
    assert refused.returncode == 5, refused.stdout + refused.stderr
    assert "still running on the old configuration" in refused.stderr
    assert "writable by a non-root user" in refused.stderr
    assert f"chown root: {cfg} && chmod go-w {cfg}" in refused.stderr
    # Nothing of the refused file was applied: the change is still new to the next reload.
    assert accepted.returncode == 0, accepted.stderr
    assert "reloaded; changed: reconcile_interval_s" in accepted.stdout


def test_an_entry_removed_while_a_probe_hangs_stops_showing_verified_at_once(
    tmp_path: Path, sock: str, hanging_qemu: Path, qemu_dir: Path
) -> None:
    """A pass waits on a hanging probe (60 s timeout) when another arch's entry is removed from
    outside: that arch stops showing as verified while the pass still waits, not when it ends
    (the pass looks at the watcher's events while its probes run)."""
    source = tmp_path / "source"
    source.mkdir()
    for arch in ("aarch64", "s390x"):
        shutil.copyfile(qemu_dir / f"qemu-{arch}-static", source / f"qemu-{arch}-static")
    cfg = daemon_config(
        tmp_path,
        arches=["aarch64", "s390x"],
        source={"kind": "directory", "path": str(source)},
        probe={"timeout_s": 60.0, "parallelism": 1},
        api={"socket": sock, "group": None},
    )
    daemon = du.start(cfg, sock)
    hanging = tmp_path / "qemu" / "qemu-aarch64"
    try:
        daemon.wait_verified(["aarch64", "s390x"])
        shutil.copyfile(hanging_qemu, source / ".new")  # an upgrade whose probe hangs
        (source / ".new").rename(source / "qemu-aarch64-static")
        du.wait_until("the hanging probe", lambda: _probing(hanging), 30)
        daemon.ns_ok("echo -1 > /proc/sys/fs/binfmt_misc/qemu-s390x")

        def shown_gone() -> dict[str, Any] | None:
            row = daemon.arch("s390x")
            return row if row["state"] != "verified" else None

        row = du.wait_until("s390x no longer shown as verified", shown_gone, 10, 0.02)
        still_waiting = _probing(hanging)
    finally:
        daemon.kill()
        for pid in _probe_pids(hanging):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(daemon.work, ignore_errors=True)
    assert still_waiting  # the pass that showed it had not ended
    assert (row["registered"], row["probe"]["ok"]) == (False, True), row
