"""Status never lies (issue 10): each reported way binfmtd said "working" while the kernel did
something else, reproduced in a private binfmt_misc instance with real QEMU and real probes.

Every test names the kind of fault; the asserted values are what a user sees: the state, the
platform list, the exit code and the one line that names the entry in the way and the fix.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import daemonutil as du
import pytest
from conftest import Cache, daemon_config, write_config
from daemonutil import ENTRIES, SandboxSh, run_daemon, wait_until

from binfmtd import arch as archmod
from binfmtd import config as configmod
from binfmtd.binfmt import Registration, parse_entry
from binfmtd.engine import TickReport
from binfmtd.preflight import Exit
from binfmtd.service import MAX_FAILED_PASSES, Daemon

SECCOMP = Path(__file__).with_name("seccomp_native.py")


def foreign(cache: Cache, arch: str, name: str | None = None) -> Registration:
    """An entry another tool (binfmt-support, NixOS...) makes for `arch`, with the F flag."""
    row = archmod.BY_NAME[arch]
    path = str(cache.qemu_dir / f"qemu-{arch}-static")
    return Registration(name or row.entry_name, row.magic, row.mask, path, "F")


def register(reg: Registration) -> str:
    """Shell that registers `reg` in the current instance."""
    return f"printf '%s' '{reg.register_string()}' > {ENTRIES}/register"


def oneshot(
    sandbox_sh: SandboxSh, tmp: Path, cfgs: list[Path], before: str = "", prefix: str = ""
) -> list[dict[str, Any]]:
    """`binfmtd --oneshot --json` once per config, all in one private instance."""
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    script = before + "\n"
    for i, cfg in enumerate(cfgs):
        script += (
            f'rc=0; {prefix} "$BINFMTD" --oneshot --json --config {cfg} '
            f'>"$OUT/{i}.out" 2>"$OUT/{i}.err" || rc=$?; echo $rc >"$OUT/{i}.rc"\n'
            f'grep -H . {ENTRIES}/* >"$OUT/{i}.entries" 2>/dev/null || true\n'
        )
    done = sandbox_sh(script, env={"OUT": str(out)})
    assert done.returncode == 0, done.stderr
    runs = []
    for i in range(len(cfgs)):
        text = (out / f"{i}.out").read_text()
        entries: dict[str, str] = {}
        for line in (out / f"{i}.entries").read_text().splitlines():
            path, _, value = line.partition(":")
            entries.setdefault(Path(path).name, "")
            entries[Path(path).name] += value + "\n"
        doc = json.loads(text) if text.strip() else None
        runs.append(
            {
                "rc": int((out / f"{i}.rc").read_text()),
                "doc": doc,
                "rows": {r["arch"]: r for r in doc["arches"]} if doc else {},
                "stderr": (out / f"{i}.err").read_text(),
                "entries": entries,
            }
        )
    return runs


def no_traceback(text: str) -> bool:
    """Nothing a user sees is a Python traceback."""
    return "Traceback" not in text


# ---------------------------------------------------------------- 1. whole instance disabled


def test_instance_disabled_is_reported_and_withdrawn_within_one_pass(
    daemons: list[du.Daemon], tmp_path: Path
) -> None:
    """echo 0 > status: every arch instance-disabled, platforms drop them, check 1, logged."""
    daemon = run_daemon(daemons, daemon_config(tmp_path))
    daemon.wait_verified(["aarch64", "s390x"])
    daemon.ns_ok(f"echo 0 > {ENTRIES}/status")

    def withdrawn() -> dict[str, Any] | None:
        rows = daemon.arches()
        return rows if {r["state"] for r in rows.values()} == {"instance-disabled"} else None

    rows = wait_until("instance-disabled everywhere", withdrawn, 10)
    assert f"echo 1 > {ENTRIES}/status" in rows["aarch64"]["error"]
    platforms = daemon.ctl("platforms").stdout.strip().split(",")
    assert "linux/arm64" not in platforms and "linux/s390x" not in platforms
    assert "linux/amd64" in platforms  # the host's own programs do not need binfmt_misc
    check = daemon.ctl("check")
    assert check.returncode == 1
    assert any(
        line.startswith("aarch64: ") and "instance-disabled" in line
        for line in check.stdout.splitlines()
    ), check.stdout
    assert daemon.events("binfmt_misc_disabled")
    daemon.ns_ok(f"echo 1 > {ENTRIES}/status")
    daemon.wait_verified(["aarch64", "s390x"], timeout=10)
    assert daemon.events("binfmt_misc_enabled")


def test_worker_platforms_follow_an_instance_disable(
    tmp_path: Path, sock: str, daemons: list[du.Daemon]
) -> None:
    """The BuildKit worker stops advertising emulated platforms once the instance is off."""
    from test_worker_daemon import _daemon, _served, _wait

    running = _daemon(tmp_path, sock, daemons)
    _wait("worker serving arm64", lambda: "linux/arm64" in _served(running["kit"]))
    daemon = daemons[-1]
    daemon.ns_ok(f"echo 0 > {ENTRIES}/status")
    served = _wait(
        "emulated platforms withdrawn",
        lambda: "linux/arm64" not in (s := _served(running["kit"])) and s,
    )
    assert not {"linux/s390x", "linux/riscv64"} & set(served)
    assert "linux/amd64" in served


# ---------------------------------------------------------------- 2. disabled foreign entry


def test_disabled_foreign_entry_is_foreign_disabled_not_success(
    sandbox_sh: SandboxSh, tmp_path: Path, cache: Cache
) -> None:
    """binfmt-support's qemu-aarch64 present but disabled: foreign-disabled, exit 1, left as is."""
    cfg = write_config(tmp_path, arches=["aarch64", "s390x"])
    before = register(foreign(cache, "aarch64")) + f"\necho 0 > {ENTRIES}/qemu-aarch64"
    (run,) = oneshot(sandbox_sh, tmp_path, [cfg], before)
    assert run["rc"] == Exit.ARCH_FAILED
    row = run["rows"]["aarch64"]
    assert row["state"] == "foreign-disabled"
    assert "linux/arm64" not in run["doc"]["platforms"]
    line = [x for x in run["stderr"].splitlines() if x.startswith("binfmtd: aarch64: ")]
    assert len(line) == 1
    assert "entry qemu-aarch64 (" + str(cache.qemu_dir) in line[0]
    assert f"echo 1 > {ENTRIES}/qemu-aarch64" in line[0]
    assert run["entries"]["qemu-aarch64"].startswith("disabled\n")
    assert run["rows"]["s390x"]["state"] == "verified"


# ---------------------------------------------------------------- 3. other tools' names


@pytest.mark.parametrize("name", ["aarch64-linux", "x86_64"])
def test_foreign_handler_under_another_name_is_never_competed_with_under_leave(
    sandbox_sh: SandboxSh, tmp_path: Path, cache: Cache, name: str
) -> None:
    """NixOS's aarch64-linux (box64-style names too): no qemu-aarch64 registered, foreign, 1."""
    cfg = write_config(tmp_path, arches=["aarch64", "s390x"])
    (run,) = oneshot(sandbox_sh, tmp_path, [cfg], register(foreign(cache, "aarch64", name)))
    assert run["rc"] == Exit.ARCH_FAILED
    assert "qemu-aarch64" not in run["entries"]
    row = run["rows"]["aarch64"]
    assert row["state"] == "foreign"
    assert row["handler"]["entry"] == name and row["handler"]["owner"] == "foreign"
    assert (row["checksum"], row["qemu_version"]) == (None, None)
    assert "linux/arm64" not in run["doc"]["platforms"]
    assert f"binfmtd: aarch64: foreign: entry {name} (" in run["stderr"]
    assert "conflict_policy: replace" in run["stderr"]


def test_foreign_handler_added_after_ours_is_shown_as_the_handler(
    daemons: list[du.Daemon], tmp_path: Path, cache: Cache
) -> None:
    """A foreign entry registered after ours runs aarch64: status shows it, not our sha/version."""
    daemon = run_daemon(daemons, daemon_config(tmp_path))
    daemon.wait_verified(["aarch64", "s390x"])
    nix = foreign(cache, "aarch64", "aarch64-linux")
    daemon.ns_ok(register(nix))
    row = wait_until(
        "aarch64 shadowed",
        lambda: (r := daemon.arch("aarch64"))["state"] == "shadowed-by-foreign" and r,
        10,
    )
    assert (row["interpreter"], row["checksum"], row["qemu_version"]) == (
        nix.interpreter,
        None,
        None,
    )
    assert "entry aarch64-linux (" in row["error"]
    assert "linux/arm64" not in daemon.ctl("platforms").stdout
    check = daemon.ctl("check")
    assert check.returncode == 1 and "aarch64-linux" in check.stdout
    daemon.ns_ok(f"echo -1 > {ENTRIES}/aarch64-linux")
    daemon.wait_verified(["aarch64"], timeout=10)  # ours handles it again: proven anew


# ---------------------------------------------------------------- 4. host-native formats


@pytest.mark.parametrize("policy", ["leave", "replace"])
def test_leftover_i386_entry_on_an_x86_64_host(
    sandbox_sh: SandboxSh, tmp_path: Path, cache: Cache, policy: str
) -> None:
    """A qemu-i386 catching the host's 32-bit programs: native-shadowed under leave (exit 1, no
    linux/386); removed under replace, then i386 proven native by its probe (exit 0)."""
    cfg = write_config(tmp_path, arches=["s390x"], conflict_policy=policy)
    (run,) = oneshot(sandbox_sh, tmp_path, [cfg], register(foreign(cache, "i386")))
    if policy == "leave":
        assert run["rc"] == Exit.ARCH_FAILED
        assert run["rows"]["i386"]["state"] == "native-shadowed"
        assert "linux/386" not in run["doc"]["platforms"]
        assert "binfmtd: i386: native-shadowed: entry qemu-i386 (" in run["stderr"]
        assert "qemu-i386" in run["entries"]
    else:
        assert run["rc"] == 0, run["stderr"]
        assert "i386" not in run["rows"] and "qemu-i386" not in run["entries"]
        assert run["doc"]["native_proof"]["i386"] == "the probe ran natively"
        assert "linux/386" in run["doc"]["platforms"]


def test_seccomp_killed_native_probe_is_native_and_never_flips(
    sandbox_sh: SandboxSh, tmp_path: Path
) -> None:
    """Under SystemCallArchitectures=native the i386 probe dies of SIGSYS: i386 is native (said
    so), no qemu-i386 registered, and a second start changes nothing."""
    cfg = write_config(tmp_path, arches=["i386", "s390x"])
    prefix = f'"$PYTHON" {SECCOMP}'
    runs = oneshot(sandbox_sh, tmp_path, [cfg, cfg], prefix=prefix)
    for run in runs:
        assert run["rc"] == 0, run["stderr"]
        assert "i386" in run["doc"]["native"]
        assert "seccomp" in run["doc"]["native_proof"]["i386"]
        assert "qemu-i386" not in run["entries"]
        assert "linux/386" in run["doc"]["platforms"]
    assert runs[1]["doc"]["actions"] == []


def test_uname_that_disagrees_with_the_running_binary_never_registers_the_host_format(
    sandbox_sh: SandboxSh, tmp_path: Path
) -> None:
    """setarch i686 makes uname -m say i686 on this x86_64 host: x86_64 (our own format) is
    native by the running binary's header, so qemu-x86_64 is never registered."""
    cfg = write_config(tmp_path, arches=["x86_64", "s390x"])
    (run,) = oneshot(sandbox_sh, tmp_path, [cfg], prefix="setarch i686")
    assert run["rc"] == 0, run["stderr"]
    assert "x86_64" in run["doc"]["native"]
    assert "qemu-x86_64" not in run["entries"]
    assert run["rows"]["s390x"]["state"] == "verified"


# ---------------------------------------------------------------- 5. probes that cannot start


def test_probe_that_cannot_start_is_a_value_and_the_daemon_stays_up(
    daemons: list[du.Daemon], tmp_path: Path
) -> None:
    """An entry catching the host's own programs with a missing interpreter: chroot cannot even
    be executed; probes fail as values, x86_64 is native-shadowed, the API keeps answering."""
    daemon = run_daemon(daemons, daemon_config(tmp_path))
    daemon.wait_verified(["aarch64", "s390x"])
    row = archmod.BY_NAME["x86_64"]
    trap = Registration("host-trap", row.magic, row.mask, "/nonexistent/interp", "")
    daemon.ns_ok(register(trap))  # sh starts before the entry exists; printf is a builtin
    code, answer = daemon.post("/v1/verify")
    assert code == 200 and sorted(answer["failed"]) == ["aarch64", "s390x"], answer
    rows = daemon.arches()
    for arch in ("aarch64", "s390x"):
        assert rows[arch]["state"] == "failed"
        assert rows[arch]["probe"]["error"].startswith("cannot start the probe: "), rows[arch]
    shadowed = wait_until("x86_64 native-shadowed", lambda: daemon.arches().get("x86_64"), 10)
    assert shadowed["state"] == "native-shadowed" and "host-trap" in shadowed["error"]
    assert "linux/amd64" not in daemon.get("/v1/platforms")[1]["platforms"]
    assert daemon.get("/v1/health")[1]["ok"]
    assert daemon.proc.poll() is None
    assert no_traceback(daemon.log_text())


def test_unwritable_probe_roots_are_per_arch_errors(sandbox_sh: SandboxSh, tmp_path: Path) -> None:
    """Probe roots on a read-only file system: each arch failed with the reason, exit 1."""
    cfg = write_config(tmp_path, arches=["aarch64", "s390x"])
    roots = tmp_path / "state" / "probe-roots"
    before = f"mkdir -p {roots} && mount -t tmpfs -o ro,size=64k,mode=0700 tmpfs {roots}"
    (run,) = oneshot(sandbox_sh, tmp_path, [cfg], before)
    assert run["rc"] == Exit.ARCH_FAILED
    for arch in ("aarch64", "s390x"):
        row = run["rows"][arch]
        assert row["state"] == "failed"
        assert "cannot prepare the probe root" in row["probe"]["error"], row
        assert "Read-only file system" in row["probe"]["error"]
    assert no_traceback(run["stderr"])


def test_full_disk_for_probe_roots_fails_only_the_arch_that_did_not_fit(
    sandbox_sh: SandboxSh, tmp_path: Path
) -> None:
    """Probe roots on a one-page tmpfs: one probe fits, the other arch fails with ENOSPC as its
    own result; the pass goes on, exit 1, no traceback."""
    cfg = write_config(tmp_path, arches=["aarch64", "s390x"])
    roots = tmp_path / "state" / "probe-roots"
    before = f"mkdir -p {roots} && mount -t tmpfs -o size=4k,mode=0700 tmpfs {roots}"
    (run,) = oneshot(sandbox_sh, tmp_path, [cfg], before)
    assert run["rc"] == Exit.ARCH_FAILED
    states = sorted(r["state"] for r in run["rows"].values())
    assert states == ["failed", "verified"], run["rows"]
    (failed,) = [r for r in run["rows"].values() if r["state"] == "failed"]
    assert "cannot prepare the probe root" in failed["probe"]["error"]
    assert "No space left on device" in failed["probe"]["error"]
    assert no_traceback(run["stderr"])


def test_full_disk_for_the_state_file_registers_nothing_unrecorded(
    sandbox_sh: SandboxSh, tmp_path: Path
) -> None:
    """ENOSPC saving the ownership record: nothing is registered (it would be nobody's), each
    arch says why, exit 1, no traceback."""
    cfg = write_config(tmp_path, arches=["aarch64", "s390x"])
    state = tmp_path / "state"
    before = (
        f"mkdir -p {state} && mount -t tmpfs -o size=8k tmpfs {state} && "
        f"(dd if=/dev/zero of={state}/filler bs=4k count=64 2>/dev/null || true)"
    )
    (run,) = oneshot(sandbox_sh, tmp_path, [cfg], before)
    assert run["rc"] == Exit.ARCH_FAILED
    for arch in ("aarch64", "s390x"):
        assert "not saved" in run["rows"][arch]["error"], run["rows"][arch]
        assert "No space left on device" in run["rows"][arch]["error"]
    assert not [n for n in run["entries"] if n.startswith("qemu-")]
    assert no_traceback(run["stderr"])


def test_truncated_source_is_a_per_arch_error(
    sandbox_sh: SandboxSh, tmp_path: Path, cache: Cache
) -> None:
    """A .deb cut in half (EOFError deep in xz/gzip): each arch says so, exit 1, no traceback."""
    deb = tmp_path / "half.deb"
    data = cache.qemu_deb.read_bytes()
    deb.write_bytes(data[: len(data) // 2])
    cfg = write_config(
        tmp_path, arches=["aarch64", "s390x"], source={"kind": "deb", "path": str(deb)}
    )
    (run,) = oneshot(sandbox_sh, tmp_path, [cfg])
    assert run["rc"] == Exit.ARCH_FAILED
    assert no_traceback(run["stderr"])
    errors = [r["error"] or "" for r in run["rows"].values() if r["state"] != "verified"]
    assert errors and all("truncated" in e for e in errors), run["rows"]


# ---------------------------------------------------------------- 6. ownership by record


def test_other_tools_entry_under_install_dir_is_not_ours(
    sandbox_sh: SandboxSh, tmp_path: Path, cache: Cache
) -> None:
    """Another tool's qemu-riscv64 whose interpreter lies in install_dir is never removed as
    "no longer configured": only recorded entries are binfmtd's."""
    install = tmp_path / "qemu"
    theirs = install / "theirs-riscv64"
    reg = foreign(cache, "riscv64")
    reg = Registration(reg.name, reg.magic, reg.mask, str(theirs), "F")
    before = f"mkdir -p {install} && cp {cache.qemu_dir}/qemu-riscv64-static {theirs}\n" + register(
        reg
    )
    cfg = write_config(tmp_path, arches=["s390x"])
    (run,) = oneshot(sandbox_sh, tmp_path, [cfg], before)
    assert run["rc"] == 0, run["stderr"]
    assert parse_entry("qemu-riscv64", run["entries"]["qemu-riscv64"]).matches(reg)
    assert not [a for a in run["doc"]["actions"] if "riscv64" in a]


def test_remove_on_stop_spares_other_tools_entries_under_install_dir(
    tmp_path: Path, sock: str, cache: Cache
) -> None:
    """remove_on_stop removes exactly what binfmtd recorded, not what lives under install_dir."""
    install = tmp_path / "qemu"
    theirs = install / "theirs-riscv64"
    reg = foreign(cache, "riscv64")
    reg = Registration(reg.name, reg.magic, reg.mask, str(theirs), "F")
    before = f"mkdir -p {install} && cp {cache.qemu_dir}/qemu-riscv64-static {theirs}\n" + register(
        reg
    )
    after = f"ls {ENTRIES} > $WORK/after"
    cfg = daemon_config(
        tmp_path, arches=["s390x"], remove_on_stop=True, api={"socket": sock, "group": None}
    )
    with du.running(cfg, sock, mode="compose", before=before, after=after) as daemon:
        daemon.wait_verified(["s390x"])
        assert daemon.stop() == 0
        left = (daemon.work / "after").read_text().split()
        assert "qemu-riscv64" in left and "qemu-s390x" not in left


def test_install_dir_change_and_an_old_state_file_keep_ownership(
    sandbox_sh: SandboxSh, tmp_path: Path
) -> None:
    """install_dir moved: our entries are re-registered, not called foreign; a state file from
    before the record (no "entries") adopts exactly the entries running its emulators."""
    first = write_config(tmp_path, arches=["aarch64", "s390x"])
    text = first.read_text()
    moved = tmp_path / "moved.yaml"
    moved.write_text(text.replace(str(tmp_path / "qemu"), str(tmp_path / "qemu2")))
    state = tmp_path / "state" / "state.json"
    strip = (
        f'"$PYTHON" -c "import json,sys; p=sys.argv[1]; d=json.load(open(p)); '
        f"d.pop('entries'); json.dump(d, open(p, 'w'))\" {state}"
    )
    out = tmp_path / "out"
    out.mkdir()
    script = (
        f'"$BINFMTD" --oneshot --config {first} >/dev/null 2>&1\n{strip}\n'
        f'rc=0; "$BINFMTD" --oneshot --json --config {first} >"$OUT/a" 2>"$OUT/aerr" || rc=$?\n'
        'echo $rc >"$OUT/arc"\n'
        f'rc=0; "$BINFMTD" --oneshot --json --config {moved} >"$OUT/b" 2>"$OUT/berr" || rc=$?\n'
        'echo $rc >"$OUT/brc"\n'
        f'cat {ENTRIES}/qemu-aarch64 >"$OUT/entry" || true\n'
    )
    done = sandbox_sh(script, env={"OUT": str(out)})
    assert done.returncode == 0, done.stderr
    assert (out / "arc").read_text().strip() == "0", (out / "aerr").read_text()
    assert json.loads((out / "a").read_text())["actions"] == []  # adopted: a no-op
    assert (out / "brc").read_text().strip() == "0", (out / "berr").read_text()
    moved_run = json.loads((out / "b").read_text())
    assert "register qemu-aarch64" in moved_run["actions"]
    assert "made by another tool" not in (out / "berr").read_text()
    entry = parse_entry("qemu-aarch64", (out / "entry").read_text())
    assert entry.interpreter == str(tmp_path / "qemu2" / "qemu-aarch64")
    record = json.loads(state.read_text())["entries"]
    assert sorted(record) == ["qemu-aarch64", "qemu-s390x"]


# ---------------------------------------------------------------- 7. operator disable


def test_operator_disable_is_its_own_fine_state_and_enable_says_so(
    daemons: list[du.Daemon], tmp_path: Path
) -> None:
    """disable: operator-disabled, check 0, verify skips it; enable is logged as the operator's."""
    daemon = run_daemon(daemons, daemon_config(tmp_path))
    daemon.wait_verified(["aarch64", "s390x"])
    done = daemon.ctl("disable", "aarch64")
    assert (done.returncode, done.stdout.strip()) == (0, "aarch64: operator-disabled")
    row = daemon.arch("aarch64")
    assert (row["state"], row["error"]) == ("operator-disabled", None)
    assert daemon.ctl("check").returncode == 0
    verify = daemon.ctl("verify")
    assert verify.returncode == 0 and "FAILED" not in verify.stdout
    assert "aarch64: disabled by the operator" in verify.stdout
    assert daemon.ctl("enable", "aarch64").stdout.strip() == "aarch64: verified"
    enabled = daemon.events("entry_enabled")
    assert [e["reason"] for e in enabled] == ["enabled by the operator"]


def test_disable_of_an_arch_another_tool_runs_says_it_is_not_disabled(
    tmp_path: Path, sock: str, cache: Cache
) -> None:
    """Debian's qemu-aarch64 under leave: disable fails naming the entry; the kernel runs it on."""
    debian = foreign(cache, "aarch64")
    cfg = daemon_config(tmp_path, api={"socket": sock, "group": None})
    with du.running(cfg, sock, mode="compose", before=register(debian)) as daemon:
        done = daemon.ctl("disable", "aarch64")
        assert done.returncode != 0
        assert (
            "aarch64 is not disabled (nothing changed): foreign: entry qemu-aarch64 ("
            in done.stderr
        )
        entry = daemon.ns_ok(f"cat {ENTRIES}/qemu-aarch64").stdout
        assert entry.startswith("enabled\n")


# ---------------------------------------------------------------- the per-pass guard


class Boom(RuntimeError):
    """An unexpected failure inside a pass."""


def test_unexpected_exception_keeps_serving_stale_then_exits_72(tmp_path: Path) -> None:
    """A pass that raises: traceback logged, last good status kept and marked stale; a good pass
    clears it; MAX_FAILED_PASSES in a row stop the daemon with exit 72."""
    cfg = configmod.load(str(write_config(tmp_path, arches=["s390x"])))
    daemon = Daemon(cfg, sandbox=None, config_path=None)
    fail = True

    def tick(verify_also: Iterable[str] = (), **_seams: Any) -> TickReport:
        if fail:
            raise Boom("bad day")
        return TickReport()

    daemon.engine.tick = tick  # type: ignore[method-assign,assignment]  # the seam for a fault
    daemon._publish()
    daemon._tick()
    assert daemon.published.status.daemon.stale is True
    assert not daemon.stopping
    fail = False
    daemon._tick()
    assert daemon.published.status.daemon.stale is False
    fail = True
    for _ in range(MAX_FAILED_PASSES):
        daemon._tick()
    assert daemon.stopping and daemon.exit_code == Exit.SOFTWARE == 72


def test_oneshot_internal_error_is_one_line_exit_72(tmp_path: Path) -> None:
    """--oneshot never shows a traceback: an unexpected failure is one line and exit 72."""
    cfg = write_config(tmp_path, arches=["s390x"])
    code = (
        "import sys; from binfmtd import engine, daemon\n"
        "def boom(self, verify_also=()): raise RuntimeError('bad day')\n"
        "engine.Engine.tick = boom\n"
        f"sys.exit(daemon.main(['--oneshot', '--sandbox', '--config', {str(cfg)!r}]))\n"
    )
    done = subprocess.run(
        [*du.OUTER, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=str(du.REPO),
    )
    assert done.returncode == 72, done.stderr
    assert "binfmtd: internal error: RuntimeError: bad day" in done.stderr
    assert no_traceback(done.stderr)
