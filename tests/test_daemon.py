"""The daemon as a real process: drift repair, fail-closed status, access, sd_notify, signals.

Every daemon runs in a private binfmt_misc instance (`binfmtd --sandbox`, or composed into a
namespace the test made; see daemonutil). Drift is injected for real from inside the daemon's
namespaces with nsenter; the daemon is observed only through its socket, its log and the kernel.
"""

from __future__ import annotations

import contextlib
import grp
import itertools
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import daemonutil as du
import pytest
from conftest import Cache, accounts, write_config
from daemonutil import ENTRIES, Daemon

from binfmtd import arch as archmod
from binfmtd.binfmt import Entry, Registration, parse_entry

ARCHES = ["aarch64", "s390x", "riscv64"]
INTERVAL = 0.2
REPAIR_S = 5.0  # two intervals plus probe time, with a wide margin for a loaded machine
OUR_FLAGS = "POF"
SEEN_MARGIN_S = 0.6  # a tick that ended this long after the drift started after it


@pytest.fixture(autouse=True)
def _drop_emulators(tmp_path: Path) -> Iterator[None]:
    """Each daemon installs ~35 MB of QEMU under tmp_path; pytest keeps three runs of those."""
    yield
    for name in ("qemu", "spare"):
        shutil.rmtree(tmp_path / name, ignore_errors=True)


def daemon_config(tmp_path: Path, sock: str, **overrides: Any) -> Path:
    """A fast daemon config: three arches, 0.2 s reconcile interval, JSON log at info."""
    body: dict[str, Any] = {
        "api": {"socket": sock, "group": None},
        "lock_file": str(tmp_path / "run" / "binfmtd.lock"),
        "reconcile_interval_s": INTERVAL,
        "arches": ARCHES,
        "log": {"level": "info", "format": "json"},
    }
    return write_config(tmp_path, **{**body, **overrides})


@pytest.fixture
def daemon(tmp_path: Path, sock: str) -> Iterator[Daemon]:
    """A --sandbox daemon with the default config, ready."""
    with du.running(daemon_config(tmp_path, sock), sock) as running:
        yield running


def registration(arch: str, interpreter: str, flags: str, name: str | None = None) -> Registration:
    """The entry for `arch` with another interpreter or flags, as another tool would make it."""
    row = archmod.BY_NAME[arch]
    return Registration(name or row.entry_name, row.magic, row.mask, interpreter, flags)


def register(reg: Registration) -> str:
    """Shell that registers `reg` in the current namespace's instance."""
    return f"printf '%s' '{reg.register_string()}' > {ENTRIES}/register"


def entry_in(daemon: Daemon, name: str) -> Entry | None:
    """The kernel's entry `name` in the daemon's instance (None when absent)."""
    done = daemon.ns(f"cat {ENTRIES}/{name}")
    return parse_entry(name, done.stdout) if done.returncode == 0 else None


def rows(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """arch -> its status row."""
    return {a["arch"]: a for a in status["arches"]}


def ctl_status(daemon: Daemon) -> dict[str, Any] | None:
    """`binfmtctl status --json` as a subprocess (None when it failed)."""
    done = daemon.ctl("status", "--json")
    return json.loads(done.stdout) if done.returncode == 0 else None


class Watcher(du.Poller):
    """Polls GET /v1/status in a thread, keeping every snapshot, to check invariants later."""

    def __init__(self, sock: str) -> None:
        super().__init__()
        self.sock = sock
        self.snapshots: list[dict[str, Any]] = []

    def poll(self) -> None:
        """Keep one snapshot (none when the daemon did not answer)."""
        with contextlib.suppress(OSError, AssertionError, ValueError):
            self.snapshots.append(du.get_json(self.sock, "/v1/status", timeout=2.0))

    def wait_for_tick_after(self, moment: float, what: str) -> None:
        """Until a snapshot comes from a reconcile tick that ran after `moment` (+ margin)."""
        du.wait_until(
            what,
            lambda: any(
                (s["daemon"]["last_reconcile"] or 0) > moment + SEEN_MARGIN_S
                for s in self.snapshots[-3:]
            ),
            REPAIR_S,
        )


def genuine_sha(cache: Cache, arch: str) -> str:
    """The sha256 of the source's emulator for `arch`."""
    return du.sha256_file(cache.qemu_dir / f"qemu-{arch}-static")


def is_right(row: dict[str, Any], install: Path, sha: str | None = None) -> bool:
    """Verified with binfmtd's own enabled POF entry (and, if given, the genuine sha)."""
    return (
        row["state"] == "verified"
        and row["registered"]
        and row["enabled"]
        and row["flags"] == OUR_FLAGS
        and row["interpreter"] == str(install / f"qemu-{row['arch']}")
        and bool(row["probe"] and row["probe"]["ok"])
        and (sha is None or row["sha256"] == sha)
    )


def assert_never_falsely_verified(
    snapshots: list[dict[str, Any]],
    install: Path,
    shas: dict[str, str],
    drifted: tuple[str, ...],
    times: tuple[float, float],
) -> None:
    """No snapshot calls an arch verified unless its entry is ours, enabled, POF, genuine; and
    once the daemon has had a tick to see the drift, only on a probe run after it."""
    before, done = times
    for status in snapshots:
        seen_drift = (status["daemon"]["last_reconcile"] or 0) > done + SEEN_MARGIN_S
        for arch, row in rows(status).items():
            if row["state"] != "verified":
                continue
            assert is_right(row, install, shas[arch]), f"falsely verified: {row}"
            if seen_drift and arch in drifted:
                assert row["probe"]["at"] > before, (
                    f"verified on a probe older than the drift: {row}"
                )


# --- 1. drift is repaired and re-verified ----------------------------------------------------


@dataclass(frozen=True)
class Drift:
    """One kind of drift: shell run inside the daemon's namespaces, and what must be repaired."""

    script: Callable[[Path, Path, Cache], str]  # (install_dir, spare dir, cache) -> shell
    repairs: tuple[str, ...]  # actions the reconcile_finished event must list
    arches: tuple[str, ...] = ("aarch64",)  # arches knocked out
    policy: str = "leave"


def _other_flags(install: Path, _spare: Path, _cache: Cache) -> str:
    ours = str(install / "qemu-aarch64")
    return f"echo -1 > {ENTRIES}/qemu-aarch64 && " + register(registration("aarch64", ours, "F"))


def _other_interpreter(_install: Path, spare: Path, cache: Cache) -> str:
    copy = spare / "qemu-aarch64"
    return (
        f"cp {cache.qemu_dir}/qemu-aarch64-static {copy} && echo -1 > {ENTRIES}/qemu-aarch64 && "
        + register(registration("aarch64", str(copy), "F"))
    )


def _swapped_binary(install: Path, _spare: Path, cache: Cache) -> str:
    # Writing in place must fail (ETXTBSY: the kernel holds an F-flag interpreter open for
    # execution), so the bytes are swapped by a rename, as a package manager would do it.
    other, target = f"{cache.qemu_dir}/qemu-s390x-static", f"{install}/qemu-aarch64"
    return (
        f"if cat {other} > {target}; then echo 'in-place write worked' >&2; exit 1; fi; "
        f"cp {other} {install}/.swap && mv -f {install}/.swap {target}"
    )


ALL = tuple(ARCHES)
DRIFTS = {
    "entry_removed": Drift(
        lambda *_: f"echo -1 > {ENTRIES}/qemu-aarch64", ("register qemu-aarch64",)
    ),
    "entry_disabled": Drift(
        lambda *_: f"echo 0 > {ENTRIES}/qemu-aarch64", ("setenabled qemu-aarch64",)
    ),
    "other_flags": Drift(_other_flags, ("remove qemu-aarch64", "register qemu-aarch64")),
    "other_interpreter": Drift(
        _other_interpreter, ("remove qemu-aarch64", "register qemu-aarch64"), policy="replace"
    ),
    "clobbered_under_leave": Drift(
        _other_interpreter, ("remove qemu-aarch64", "register qemu-aarch64")
    ),
    "instance_flushed": Drift(
        lambda *_: f"echo -1 > {ENTRIES}/status",
        tuple(f"register qemu-{a}" for a in ARCHES),
        ALL,
    ),
    "unmounted": Drift(
        lambda *_: f"umount {ENTRIES}", tuple(f"register qemu-{a}" for a in ARCHES), ALL
    ),
    "interpreter_deleted": Drift(
        lambda install, *_: f"rm {install}/qemu-aarch64",
        ("install aarch64", "register qemu-aarch64"),
    ),
    "interpreter_swapped": Drift(_swapped_binary, ("install aarch64", "register qemu-aarch64")),
}


@pytest.mark.parametrize("kind", list(DRIFTS))
def test_drift_is_repaired_and_reverified(
    kind: str, tmp_path: Path, sock: str, cache: Cache
) -> None:
    """Each drift is repaired, re-probed and re-published within 5 s, never falsely verified."""
    drift = DRIFTS[kind]
    install = tmp_path / "qemu"
    spare = tmp_path / "spare"
    spare.mkdir()
    shas = {a: genuine_sha(cache, a) for a in ARCHES}
    cfg = daemon_config(tmp_path, sock, conflict_policy=drift.policy)
    with du.running(cfg, sock) as daemon:
        assert all(is_right(r, install, shas[a]) for a, r in rows(daemon.status()).items())
        logged = len(daemon.events("reconcile_finished"))
        with Watcher(sock) as watcher:
            before = time.time()
            daemon.ns_ok(drift.script(install, spare, cache))
            done = time.time()
            if kind == "interpreter_swapped":
                assert du.sha256_file(install / "qemu-aarch64") == shas["s390x"]

            def repaired() -> dict[str, Any] | None:
                status = ctl_status(daemon)
                good = status is not None and all(
                    is_right(row, install, shas[arch])
                    and (arch not in drift.arches or row["probe"]["at"] > before)
                    for arch, row in rows(status).items()
                )
                return status if good else None

            status = du.wait_until(f"{kind} to be repaired", repaired, REPAIR_S, every=0.05)
            watcher.wait_for_tick_after(done, "a snapshot from a tick that saw the drift")
        for arch in drift.arches:
            latency = rows(status)[arch]["probe"]["at"] - done
            assert latency < 2 * INTERVAL + 2.0, f"{arch} re-verified only after {latency:.2f} s"
            entry = entry_in(daemon, f"qemu-{arch}")
            assert entry is not None
            assert (entry.enabled, entry.flags) == (True, OUR_FLAGS)
            assert entry.interpreter == str(install / f"qemu-{arch}")
            assert du.sha256_file(install / f"qemu-{arch}") == shas[arch]
        assert_never_falsely_verified(
            watcher.snapshots, install, shas, drift.arches, (before, done)
        )
        repairs = [e for e in daemon.events("reconcile_finished")[logged:] if e["repaired"]]
        assert repairs, f"no reconcile_finished with a repair after {kind}:\n{daemon.log_text()}"
        listed = {action for event in repairs for action in event["repaired"]}
        assert set(drift.repairs) <= listed, repairs
        assert set(drift.arches) <= {a for event in repairs for a in event["verified"]}
        if kind == "unmounted":
            assert daemon.events("binfmt_misc_remounted"), daemon.log_text()


def test_foreign_entry_put_in_place_of_ours_is_probed_not_trusted(
    tmp_path: Path, sock: str
) -> None:
    """A broken foreign entry catching aarch64 first is re-probed and failed, not vouched for."""
    # Leave policy. Another tool registers its own entry for aarch64 binaries under another
    # name; the kernel tries the newest entry first, so from now on it runs them, not ours.
    with du.running(daemon_config(tmp_path, sock), sock) as daemon, Watcher(sock) as watcher:
        assert "linux/arm64" in daemon.ctl("platforms").stdout
        broken = registration("aarch64", "/bin/false", "F", name="other-aarch64")
        before = time.time()
        daemon.ns_ok(register(broken))
        done = time.time()
        row = du.wait_until(
            "the foreign entry to be probed",
            lambda: ((r := daemon.arch("aarch64"))["probe"] or {}).get("at", 0) > before and r,
            REPAIR_S,
        )
        assert row["state"] == "shadowed-by-foreign"
        assert "made by another tool and is left alone" in row["error"]
        assert "its probe failed" in row["error"]
        assert row["handler"] == {
            "entry": "other-aarch64",
            "interpreter": "/bin/false",
            "owner": "foreign",
        }
        assert "linux/arm64" not in daemon.ctl("platforms").stdout
        left = entry_in(daemon, "other-aarch64")
        assert left is not None
        assert (left.interpreter, left.flags) == ("/bin/false", "F")
        ours = entry_in(daemon, "qemu-aarch64")
        assert ours is not None and ours.flags == OUR_FLAGS
        watcher.wait_for_tick_after(done, "a snapshot from a tick that saw the foreign entry")
    seen = [
        s for s in watcher.snapshots if (s["daemon"]["last_reconcile"] or 0) > done + SEEN_MARGIN_S
    ]
    assert seen, "no snapshot from a tick after the foreign entry appeared"
    for status in seen:  # once a tick has seen it, aarch64 is never vouched for
        row = rows(status)["aarch64"]
        assert row["state"] not in {"verified", "foreign-verified"}, row


# --- 2. fail closed ------------------------------------------------------------------------


def test_arch_whose_probe_fails_is_never_reported_as_working(tmp_path: Path, sock: str) -> None:
    """A failing probe (foreign F entry running /bin/false): never verified, check 1, no arm64."""
    # The entry exists before the daemon starts (compose mode), conflict_policy leave.
    broken = registration("aarch64", "/bin/false", "F")
    cfg = daemon_config(tmp_path, sock)
    with du.running(cfg, sock, mode="compose", before=register(broken)) as daemon:
        with Watcher(sock) as watcher:
            time.sleep(4 * INTERVAL)  # several reconcile ticks to observe
        row = daemon.arch("aarch64")
        assert row["state"] == "foreign"
        assert row["probe"]["ok"] is False
        assert row["interpreter"] == "/bin/false"
        check = daemon.ctl("check")
        assert check.returncode == 1
        assert any(line.startswith("aarch64: ") for line in check.stdout.splitlines())
        assert not any(line.startswith(("s390x", "riscv64")) for line in check.stdout.splitlines())
        platforms = daemon.ctl("platforms")
        assert platforms.returncode == 0
        listed = platforms.stdout.strip().split(",")
        assert "linux/arm64" not in listed
        assert {"linux/s390x", "linux/riscv64"} <= set(listed)
        left = entry_in(daemon, "qemu-aarch64")
        assert left is not None
        assert (left.interpreter, left.flags) == ("/bin/false", "F")
    assert len(watcher.snapshots) > 5
    for status in watcher.snapshots:
        assert rows(status)["aarch64"]["state"] == "foreign"


# --- 3. access -----------------------------------------------------------------------------

MUTATIONS = (
    ("verify",),
    ("reconcile",),
    ("enable", "aarch64"),
    ("disable", "aarch64"),
    ("reload",),
)
READ_TARGETS = ("/v1/status", "/v1/platforms", "/v1/health")


@dataclass(frozen=True)
class Users:
    """A temporary group, a member of it and a user outside it."""

    group: str
    gid: int
    member: pwd.struct_passwd
    outsider: pwd.struct_passwd


@pytest.fixture
def users() -> Iterator[Users]:
    """Creates the group and both system users; removes them afterwards."""
    tag = secrets.token_hex(3)
    group, member, outsider = f"bdt-g{tag}", f"bdt-m{tag}", f"bdt-o{tag}"
    made: list[str] = []
    nologin = ["--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
    try:
        accounts(["groupadd", "--system", group])
        made.append("group")
        for name, extra in ((member, ["-G", group]), (outsider, [])):
            accounts(["useradd", *nologin, *extra, name])
            made.append(name)
        yield Users(group, grp_gid(group), pwd.getpwnam(member), pwd.getpwnam(outsider))
    finally:
        for name in reversed(made):
            accounts(["groupdel", group] if name == "group" else ["userdel", name], gone_ok=True)


def grp_gid(group: str) -> int:
    """The gid of `group`."""
    return grp.getgrnam(group).gr_gid


def as_user(user: pwd.struct_passwd, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run `argv` as `user` with its groups, via setpriv (PYTHONPATH: the repo and tests/)."""
    return subprocess.run(
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", *argv],
        env={**du.CLEAN_ENV, "PYTHONPATH": f"{du.REPO}:{du.REPO / 'tests'}"},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def user_ctl(user: pwd.struct_passwd, sock: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """binfmtctl (stdlib only, the system python) as `user`."""
    return as_user(user, du.SYSTEM_PYTHON, "-m", "binfmtd.cli", "--socket", sock, *argv)


def user_http(user: pwd.struct_passwd, sock: str, method: str, target: str) -> int:
    """The HTTP status `user` gets for one raw request."""
    code = (
        "import sys, daemonutil as du; print(du.http(sys.argv[1], sys.argv[2], sys.argv[3]).status)"
    )
    done = as_user(user, du.SYSTEM_PYTHON, "-c", code, sock, method, target)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def assert_reads_but_cannot_mutate(daemon: Daemon, user: pwd.struct_passwd, seen_uid: int) -> None:
    """`user` reads everything; each mutation is 403 / exit 4 and changes nothing."""
    sock = daemon.sock
    for target in READ_TARGETS:
        assert user_http(user, sock, "GET", target) == 200, target
    assert user_ctl(user, sock, "status").returncode == 0
    assert user_ctl(user, sock, "platforms").stdout.count("linux/arm64") == 1
    assert user_http(user, sock, "POST", "/v1/reconcile") == 403
    for argv in MUTATIONS:
        done = user_ctl(user, sock, *argv)
        assert done.returncode == 4, (argv, done.stderr)
        assert f"needs root; peer uid is {seen_uid} (HTTP 403)" in done.stderr
    assert {r["state"] for r in daemon.status()["arches"]} == {"verified"}
    assert not daemon.events("config_reloaded")


def test_group_member_reads_outsider_cannot_connect_root_mutates(
    tmp_path: Path, sock: str, users: Users
) -> None:
    """Member reads but gets 403/exit 4 on mutations; outsider EACCES/exit 4; root mutates."""
    # Compose mode maps ids 1:1, so the daemon itself sets the socket's group and sees real uids.
    cfg = daemon_config(tmp_path, sock, api={"socket": sock, "group": users.group})
    with du.running(cfg, sock, mode="compose") as daemon:
        st = os.stat(sock)
        assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o660, 0, users.gid)
        assert_reads_but_cannot_mutate(daemon, users.member, users.member.pw_uid)
        denied = user_ctl(users.outsider, sock, "status")
        assert denied.returncode == 4
        assert f"permission denied on {sock}" in denied.stderr
        assert (daemon.ctl("disable", "aarch64").returncode, daemon.arch("aarch64")["state"]) == (
            0,
            "operator-disabled",
        )
        assert daemon.ctl("enable", "aarch64").stdout.strip() == "aarch64: verified"


def test_sandboxed_daemon_sees_unmapped_peers_as_non_root(
    tmp_path: Path, sock: str, users: Users
) -> None:
    """Under --sandbox a member's uid arrives as 65534 and is refused; host root stays uid 0."""
    # --sandbox maps only root, so the daemon cannot chgrp the socket: the test does it.
    with du.running(daemon_config(tmp_path, sock), sock) as daemon:
        os.chown(sock, -1, users.gid)  # the daemon cannot: the group is not mapped in its ns
        assert_reads_but_cannot_mutate(daemon, users.member, 65534)
        assert daemon.ctl("reconcile").returncode == 0
        assert user_ctl(users.outsider, sock, "status").returncode == 4


# --- 4. sd_notify --------------------------------------------------------------------------


class NotifySink:
    """A real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.1)
        self.received: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.received.append((time.monotonic(), data.decode()))

    def states(self) -> list[str]:
        """The state changes in order (READY, RELOADING, STOPPING), without STATUS or pings."""
        keys = ("READY=1", "RELOADING=1", "STOPPING=1")
        return [k for _, m in list(self.received) for k in keys if k in m.split("\n")]

    def pings(self) -> list[float]:
        """When each WATCHDOG=1 arrived."""
        return [t for t, m in list(self.received) if m == "WATCHDOG=1"]

    def pings_after(self, since: float) -> list[float]:
        """Pings that arrived after `since` (monotonic)."""
        return [t for t in self.pings() if t > since]

    def wait_states(self, expected: list[str], timeout: float = 15) -> None:
        """Until the state sequence is `expected`."""
        du.wait_until(f"notify states {expected}", lambda: self.states() == expected, timeout)

    def close(self) -> None:
        """Stop collecting."""
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def sink() -> Iterator[NotifySink]:
    """A NOTIFY_SOCKET in its own directory."""
    directory = du.sock_dir()
    notify = NotifySink(os.path.join(directory, "notify"))
    yield notify
    notify.close()
    shutil.rmtree(directory, ignore_errors=True)


def test_sd_notify_ready_reloading_stopping_in_order(
    tmp_path: Path, sock: str, sink: NotifySink
) -> None:
    """READY=1 only after the first verified pass, then RELOADING=1, READY=1, STOPPING=1."""
    # Without WATCHDOG_USEC there must be no WATCHDOG=1 at all.
    env = {"NOTIFY_SOCKET": sink.path}
    with du.running(daemon_config(tmp_path, sock), sock, env=env, ready=False) as daemon:
        sink.wait_states(["READY=1"], timeout=30)
        status = daemon.status()  # the API starts before READY=1 is sent, after the first pass
        assert status["daemon"]["ready"]
        assert {r["state"] for r in status["arches"]} == {"verified"}
        ready_text = next(m for _, m in sink.received if "READY=1" in m)
        assert "STATUS=3/3 architectures verified" in ready_text.split("\n")
        names = [e["event"] for e in daemon.events()]
        assert names.index("reconcile_finished") < names.index("daemon_ready")
        daemon.signal(signal.SIGHUP)
        sink.wait_states(["READY=1", "RELOADING=1", "READY=1"])
        reloading = next(m for _, m in sink.received if "RELOADING=1" in m)
        assert reloading.split("\n")[1].startswith("MONOTONIC_USEC=")
        assert daemon.stop() == 0
        sink.wait_states(["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"], timeout=5)
    assert sink.pings() == []


def test_watchdog_pings_stop_while_the_loop_really_hangs(
    tmp_path: Path, sock: str, sink: NotifySink, cache: Cache
) -> None:
    """WATCHDOG=1 pings stop while the loop really hangs on a probe (not SIGSTOP), then resume."""
    # The hang: a foreign qemu-aarch64 entry whose interpreter is a static busybox named
    # `watch`, which re-runs its argument forever; the loop's probe blocks for probe.timeout_s.
    hang = tmp_path / "spare" / "watch"
    hang.parent.mkdir()
    shutil.copy(cache.busybox("i386"), hang)  # i386 runs natively on this x86_64 host
    cfg = daemon_config(tmp_path, sock, probe={"timeout_s": 2.5, "parallelism": 4})
    env = {"NOTIFY_SOCKET": sink.path, "WATCHDOG_USEC": "1000000"}
    with du.running(cfg, sock, env=env) as daemon:
        du.wait_until("three pings", lambda: len(sink.pings()) >= 3, 5)
        steady = sink.pings()
        assert max(b - a for a, b in itertools.pairwise(steady)) < 0.9
        wall, injected = time.time(), time.monotonic()
        foreign = registration("aarch64", str(hang), "F", name="other-aarch64")
        daemon.ns_ok(register(foreign))
        time.sleep(1.2)
        health = du.get_json(sock, "/v1/health")
        assert health["last_tick_age_s"] >= 0.8  # the loop is stuck; the server is not
        row = du.wait_until(
            "the hanging probe to time out",
            lambda: ((r := daemon.arch("aarch64"))["probe"] or {}).get("at", 0) > wall and r,
            10,
        )
        assert row["state"] == "shadowed-by-foreign"
        assert row["probe"]["error"] == "probe did not finish within 2.5 s"
        resumed = time.monotonic()
        du.wait_until("pings to resume", lambda: len(sink.pings_after(resumed)) >= 2, 3)
    pings = sink.pings()
    gaps = [(a, b - a) for a, b in itertools.pairwise(pings)]
    hung = [gap for start, gap in gaps if start >= injected - 1.0 and gap > 2.0]
    assert len(hung) == 1, gaps
    assert all(gap < 0.9 for start, gap in gaps if start >= resumed), gaps


# --- 5. signals ----------------------------------------------------------------------------

DUMP = f"""for f in {ENTRIES}/*; do
  n=${{f##*/}}; case $n in register|status) continue;; esac
  printf '=== %s\\n' "$n"; cat "$f"
done > "$WORK/after" """


def dumped(daemon: Daemon) -> dict[str, Entry]:
    """The entries the compose wrapper listed after the daemon exited."""
    text = (daemon.work / "after").read_text(encoding="utf-8")
    found = {}
    for chunk in text.split("=== ")[1:]:
        name, _, body = chunk.partition("\n")
        found[name] = parse_entry(name, body)
    return found


def test_sighup_applies_added_and_removed_arches(tmp_path: Path, sock: str) -> None:
    """SIGHUP with s390x swapped for riscv64: riscv64 registered and verified, s390x removed."""
    cfg = daemon_config(tmp_path, sock, arches=["aarch64", "s390x"])
    with du.running(cfg, sock) as daemon:
        daemon_config(tmp_path, sock, arches=["aarch64", "riscv64"])
        since = time.time()
        daemon.signal(signal.SIGHUP)

        def applied() -> bool:
            now = rows(daemon.status())
            return set(now) == {"aarch64", "riscv64"} and all(
                is_right(r, tmp_path / "qemu") for r in now.values()
            )

        du.wait_until("the new arches", applied, REPAIR_S)
        assert daemon.arch("riscv64")["probe"]["at"] > since
        assert entry_in(daemon, "qemu-s390x") is None
        riscv = entry_in(daemon, "qemu-riscv64")
        assert riscv is not None
        assert (riscv.flags, riscv.enabled) == (OUR_FLAGS, True)
        (reloaded,) = daemon.events("config_reloaded")
        assert reloaded["changed"] == ["arches"]
        assert "linux/s390x" not in daemon.ctl("platforms").stdout


def test_garbage_config_on_sighup_keeps_the_old_one(tmp_path: Path, sock: str) -> None:
    """A broken config at SIGHUP: reload_failed logged, old config kept, `reload` exits 5."""
    cfg = daemon_config(tmp_path, sock)
    good = cfg.read_text(encoding="utf-8")
    with du.running(cfg, sock) as daemon:
        pid = daemon.pid
        cfg.write_text("arches: [aarch64\nflags: {{{\n", encoding="utf-8")
        daemon.signal(signal.SIGHUP)
        (failed,) = du.wait_until("reload_failed", lambda: daemon.events("reload_failed"), 5)
        assert str(cfg) in failed["error"]
        time.sleep(3 * INTERVAL)
        assert daemon.proc.poll() is None
        status = daemon.status()
        assert status["daemon"]["pid"] == pid
        assert [r["arch"] for r in status["arches"]] == ARCHES
        assert all(is_right(r, tmp_path / "qemu") for r in status["arches"])
        refused = daemon.ctl("reload")
        assert refused.returncode == 5
        assert "still running on the old configuration" in refused.stderr
        cfg.write_text(good.replace("- riscv64\n", ""), encoding="utf-8")
        assert daemon.ctl("reload").stdout.strip() == "reloaded; changed: arches"
        assert [r["arch"] for r in daemon.status()["arches"]] == ["aarch64", "s390x"]


def test_sigterm_leaves_entries_registered_and_removes_the_socket(
    tmp_path: Path, sock: str
) -> None:
    """SIGTERM: exit 0, the socket file is gone, every entry stays (running builds keep going)."""
    with du.running(daemon_config(tmp_path, sock), sock, mode="compose", after=DUMP) as daemon:
        assert daemon.stop() == 0
        left = dumped(daemon)
        assert sorted(left) == sorted(f"qemu-{a}" for a in ARCHES)
        for arch in ARCHES:
            assert left[f"qemu-{arch}"].interpreter == str(tmp_path / "qemu" / f"qemu-{arch}")
            assert (left[f"qemu-{arch}"].flags, left[f"qemu-{arch}"].enabled) == (OUR_FLAGS, True)
        assert not os.path.lexists(sock)
        assert daemon.events("daemon_stopping")[0]["remove_on_stop"] is False
        assert not daemon.events("entries_removed_on_stop")


def test_remove_on_stop_removes_only_binfmtd_entries(
    tmp_path: Path, sock: str, cache: Cache
) -> None:
    """remove_on_stop: true removes binfmtd's own entries; another tool's entry stays."""
    foreign = registration("ppc64le", str(cache.qemu_dir / "qemu-ppc64le-static"), "F")
    cfg = daemon_config(tmp_path, sock, remove_on_stop=True)
    with du.running(cfg, sock, mode="compose", before=register(foreign), after=DUMP) as daemon:
        assert daemon.stop() == 0
        left = dumped(daemon)
        assert list(left) == ["qemu-ppc64le"]
        assert left["qemu-ppc64le"].matches(foreign)
        (removed,) = daemon.events("entries_removed_on_stop")
        assert sorted(removed["entries"]) == sorted(f"qemu-{a}" for a in ARCHES)
        assert not os.path.lexists(sock)


# --- 6. one daemon per lock; stale sockets -----------------------------------------------------


def test_second_daemon_with_the_same_lock_is_refused_with_71(
    daemon: Daemon, tmp_path: Path
) -> None:
    """Same lock_file: the second binfmtd exits 71 naming the holder's pid; the first serves on."""
    second = du.run(du.sandbox_argv(daemon.cfg), 30)
    assert second.returncode == 71, second.stderr
    lock = tmp_path / "run" / "binfmtd.lock"
    assert f"another binfmtd (pid {daemon.pid}) holds {lock}" in second.stderr
    assert "stop it first" in second.stderr
    assert du.get_json(daemon.sock, "/v1/health")["ok"]
    assert daemon.status()["daemon"]["pid"] == daemon.pid


def test_oneshot_is_refused_while_a_daemon_holds_the_lock(daemon: Daemon) -> None:
    """--oneshot next to a running daemon exits 71 and points at binfmtctl instead."""
    second = du.run([*du.sandbox_argv(daemon.cfg), "--oneshot"], 30)
    assert second.returncode == 71, second.stderr
    assert "binfmtctl reconcile" in second.stderr
    assert du.get_json(daemon.sock, "/v1/health")["ok"]


def test_stale_socket_of_a_killed_daemon_is_recovered(tmp_path: Path, sock: str) -> None:
    """A kill -9'ed daemon's socket file: binfmtctl exits 3; a restart removes it and serves."""
    cfg = daemon_config(tmp_path, sock)
    first = du.start(cfg, sock)
    try:
        first_pid = first.pid
        os.kill(first_pid, signal.SIGKILL)
        first.proc.wait(10)
    finally:
        first.kill()
        shutil.rmtree(first.work, ignore_errors=True)
    assert os.path.exists(sock)
    down = du.ctl(sock, "status")
    assert down.returncode == 3
    assert f"binfmtd is not running (connection refused on {sock})" in down.stderr
    with du.running(cfg, sock) as second:
        assert second.pid != first_pid
        assert second.events("stale_socket_removed")[0]["path"] == sock
        assert all(is_right(r, tmp_path / "qemu") for r in second.status()["arches"])


# --- 7. hostile and numerous clients -----------------------------------------------------------


def raw_answer(sock: str, payload: bytes, *, shut: bool = False, timeout: float = 5.0) -> bytes:
    """Send `payload` (then half-close if `shut`) and read until the daemon closes.

    A daemon that closes with our excess input unread makes the kernel reset the connection
    once its answer has been read: that counts as the end, too.
    """
    chunks = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(sock)
        conn.sendall(payload)
        if shut:
            conn.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError):
            while chunk := conn.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


class GoodClient(du.Poller):
    """Asks for the status again and again, checking every answer, until stopped."""

    every = 0.005

    def __init__(self, sock: str, pid: int) -> None:
        super().__init__()
        self.sock, self.pid = sock, pid
        self.answers = 0
        self.slowest = 0.0
        self.problems: list[str] = []

    def poll(self) -> None:
        """One status request, checked; a problem is recorded, not raised."""
        started = time.monotonic()
        try:
            status = du.get_json(self.sock, "/v1/status", timeout=5.0)
            assert status["daemon"]["pid"] == self.pid
            assert [r["state"] for r in status["arches"]] == ["verified"] * len(ARCHES)
        except (OSError, AssertionError, ValueError, KeyError) as exc:
            self.problems.append(repr(exc))
        else:
            self.answers += 1
        self.slowest = max(self.slowest, time.monotonic() - started)


def crowd_member(sock: str) -> int:
    """One of many clients: three status requests on fresh connections; how many were right."""
    right = 0
    for _ in range(3):
        status = du.get_json(sock, "/v1/status", timeout=20.0)
        right += len(status["arches"]) == len(ARCHES)
    return right


def test_hostile_and_numerous_clients_do_not_disturb_a_good_one(daemon: Daemon) -> None:
    """Garbage, oversized, slow, half-closed and 200 concurrent clients never disturb a good one."""
    sock = daemon.sock
    with GoodClient(sock, daemon.pid) as good, contextlib.ExitStack() as stack:
        slow = []
        for _ in range(20):  # partial request, then silence, held open for the whole test
            conn = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            conn.connect(sock)
            conn.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            slow.append(conn)
        garbage = raw_answer(sock, secrets.token_bytes(3000).replace(b"\n", b"") + b"\r\n\r\n")
        assert garbage.startswith(b"HTTP/1.1 400 "), garbage[:80]
        huge_head = b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100_000 + b"\r\n\r\n"
        assert raw_answer(sock, huge_head).startswith(b"HTTP/1.1 431 ")
        huge_body = b"POST /v1/verify HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n{"
        assert raw_answer(sock, huge_body).startswith(b"HTTP/1.1 413 ")
        started = time.monotonic()
        half = raw_answer(sock, b"GET /v1/sta", shut=True)
        assert time.monotonic() - started < 2.0  # answered or dropped at once, not left hanging
        assert half == b"" or half.startswith(b"HTTP/1.1 400 "), half[:80]
        whole_then_shut = raw_answer(sock, b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n", shut=True)
        assert du.parse_response(whole_then_shut).json()["ok"] is True
        with ThreadPoolExecutor(max_workers=200) as pool:
            counts = list(pool.map(crowd_member, [sock] * 200))
        assert counts == [3] * 200
        for conn in slow:  # unanswered so far: an incomplete request is only timed out
            conn.setblocking(False)
            with pytest.raises(BlockingIOError):
                conn.recv(1)
        for conn in slow:  # ... after the server's 5 s request timeout, with a 408
            conn.settimeout(10)
            assert conn.recv(65536).startswith(b"HTTP/1.1 408 ")
    assert good.problems == []
    assert good.answers > 20
    assert good.slowest < 3.0
    assert daemon.proc.poll() is None
    assert du.get_json(sock, "/v1/health")["ok"]


# --- 8. binfmtctl against the real daemon ------------------------------------------------------


def test_binfmtctl_status_platforms_check_verify(daemon: Daemon) -> None:
    """status table, platforms (native first), check exits 0, verify aarch64 re-probes."""
    status = daemon.ctl("status")
    assert status.returncode == 0, status.stderr
    table = status.stdout.split("\n\n", 1)[1].splitlines()
    assert table[0].split() == ["ARCH", "PLATFORMS", "STATE", "FLAGS", "INTERPRETER", "VERIFIED"]
    assert [line.split()[:4] for line in table[1:]] == [
        [a, archmod.BY_NAME[a].platforms[0], "verified", OUR_FLAGS] for a in ARCHES
    ]
    native = daemon.status()["native"]
    emulated = [archmod.BY_NAME[a].platforms[0] for a in ARCHES]
    assert native[0] == "linux/amd64"
    assert daemon.ctl("platforms").stdout == ",".join(native + emulated) + "\n"
    check = daemon.ctl("check")
    assert (check.returncode, check.stdout) == (
        0,
        "ok: 3 architectures registered with F and verified\n",
    )
    before = daemon.arch("aarch64")["probe"]["at"]
    verify = daemon.ctl("verify", "aarch64")
    assert (verify.returncode, verify.stdout) == (0, "aarch64: verified\n")
    assert daemon.arch("aarch64")["probe"]["at"] > before
    assert daemon.ctl("reconcile").stdout == "nothing to do\n"


def test_binfmtctl_when_the_daemon_is_down_exits_3(daemon: Daemon) -> None:
    """After SIGTERM the socket is gone: exit 3 and a message that says how to start it."""
    assert daemon.stop() == 0
    done = daemon.ctl("status")
    assert done.returncode == 3
    assert done.stderr == (
        f"binfmtctl: binfmtd is not running (no socket at {daemon.sock}); "
        "start it with `systemctl start binfmtd`\n"
    )


def test_binfmtctl_offline_status_inside_the_namespace(daemon: Daemon, tmp_path: Path) -> None:
    """`status --offline --binfmt-misc` run in the daemon's namespace reads the entries itself."""
    done = daemon.ns(
        f"{du.BINFMTCTL} --socket /nonexistent status --offline --binfmt-misc {ENTRIES}"
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["ENTRY", "ENABLED", "FLAGS", "INTERPRETER", "STATE"]
    assert [line.split() for line in lines[1:4]] == [
        [f"qemu-{a}", "enabled", OUR_FLAGS, str(tmp_path / "qemu" / f"qemu-{a}"), "unverified"]
        for a in sorted(ARCHES)
    ]
    assert "3 entries; offline" in done.stdout


def test_binfmtctl_exec_runs_inside_the_sandbox(
    daemon: Daemon, tmp_path: Path, cache: Cache
) -> None:
    """`binfmtctl exec` sees the sandbox's entries (absent on the host) and runs foreign code."""
    entry = daemon.ctl("exec", "--", "cat", f"{ENTRIES}/qemu-aarch64")
    assert entry.returncode == 0, entry.stderr
    parsed = parse_entry("qemu-aarch64", entry.stdout)
    assert (parsed.interpreter, parsed.flags) == (str(tmp_path / "qemu" / "qemu-aarch64"), "POF")
    assert not os.path.exists(f"{ENTRIES}/qemu-aarch64")  # the host's instance is not mounted
    hello = daemon.ctl("exec", "--", str(cache.busybox("arm64")), "echo", "hello from arm64")
    assert (hello.returncode, hello.stdout) == (0, "hello from arm64\n")
