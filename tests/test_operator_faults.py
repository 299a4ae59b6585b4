"""Faults found by attacking the daemon as a demanding operator would (issue 14, session 7).

Each test is one kind of fault, on the real kernel (private binfmt_misc instances) with real
QEMU and real probes: what `binfmtctl` commands asked for, set against restarts and drift
(disable across a restart, a refused disable, verify of a disabled arch another tool runs), a
reload by SIGHUP that was refused, `status --offline` with the instance switched off, and the
install directory obstructed or mounted noexec. The daemons have a safety pass an hour away,
so only events, the daemon's own timers and operator commands repair anything.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import daemonutil as du
from conftest import Cache, daemon_config
from daemonutil import BINFMTCTL, ENTRIES, SandboxSh
from test_drift_faults import ARCH, config
from test_truth import foreign, register

from binfmtd import arch as archmod
from binfmtd.binfmt import Registration

FIRST_DAEMON = """"$BINFMTD" --config "$CFG" 2>"$WORK/first.log" & first=$!
i=0
until {ctl} --socket {sock} check >/dev/null 2>&1; do
  i=$((i + 1)); [ $i -gt 1200 ] && break; sleep 0.05
done
{ctl} --socket {sock} disable {arch} >"$WORK/disable.out" 2>&1
kill -TERM $first; wait $first
head -1 {entries}/qemu-{arch} >"$WORK/entry.before"
"""


def test_an_arch_the_operator_disabled_stays_disabled_across_a_restart(
    tmp_path: Path, sock: str, cache: Cache
) -> None:
    """`binfmtctl disable s390x`, then binfmtd restarts (systemctl restart, a crash, the
    watchdog): the new daemon keeps s390x off (its entry disabled, status operator-disabled,
    `check` passing as disabled by the operator) until `binfmtctl enable`. Before, the new
    daemon took binfmtd's disabled entry for someone else's drift and enabled it again: the
    kernel ran s390x binaries the operator had switched off, and status said verified."""
    cfg = config(tmp_path, sock, cache, arches=[ARCH, "aarch64"])
    before = FIRST_DAEMON.format(ctl=BINFMTCTL, sock=sock, arch=ARCH, entries=ENTRIES)
    daemon = du.start(cfg, sock, mode="compose", before=before, ready=False)
    try:
        du.wait_until("the restarted daemon", (daemon.work / "daemon.pid").exists, 90)
        assert (daemon.work / "entry.before").read_text() == "disabled\n", daemon.log_text()
        assert "operator-disabled" in (daemon.work / "disable.out").read_text()
        daemon.wait_ready()
        daemon.wait_verified(["aarch64"])
        # The restarted daemon's first pass is over (aarch64 proven): s390x was not touched.
        assert daemon.arch(ARCH)["state"] == "operator-disabled", daemon.log_text()[-3000:]
        assert daemon.ns_ok(f"head -1 {ENTRIES}/qemu-{ARCH}").stdout == "disabled\n"
        check = daemon.ctl("check")
        assert check.returncode == 0 and f"disabled by the operator ({ARCH})" in check.stdout
        state = json.loads((tmp_path / "state" / "state.json").read_text())
        assert state["operator_disabled"] == [ARCH], state
        enabled = daemon.ctl("enable", ARCH)
        assert enabled.returncode == 0, enabled.stderr
        daemon.wait_verified([ARCH])
        state = json.loads((tmp_path / "state" / "state.json").read_text())
        assert state["operator_disabled"] == [], state
    finally:
        daemon.close()


OFFLINE = f"""printf '%s' ':foreign:M::\\x7fELF\\x02::/bin/false:F' >{ENTRIES}/register
echo 0 >{ENTRIES}/status
"$PYTHON" {BINFMTCTL} status --offline --json >"$OUT/json"
"$PYTHON" {BINFMTCTL} status --offline >"$OUT/table"
"""


def test_offline_status_says_json_when_asked_and_a_disabled_instance(
    sandbox_sh: SandboxSh, tmp_path: Path
) -> None:
    """`binfmtctl status --offline --json` (the daemon down, binfmt_misc switched off as a
    whole by another tool): JSON a script can read, with `instance_enabled: false` beside
    each entry; the table says no entry runs. Before, --json was ignored (a table, which a
    monitoring script failed to parse) and both showed the entries as enabled, nothing
    saying the kernel runs none of them."""
    done = sandbox_sh(OFFLINE, env={"OUT": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    doc = json.loads((tmp_path / "json").read_text())
    assert doc["offline"] is True and doc["instance_enabled"] is False, doc
    (entry,) = doc["entries"]
    assert entry["name"] == "foreign" and entry["enabled"] is True, entry
    assert (entry["flags"], entry["interpreter"], entry["state"]) == (
        "F",
        "/bin/false",
        "unverified",
    )
    assert entry["magic"] == "7f454c4602" and entry["offset"] == 0, entry
    assert "binfmt_misc is disabled as a whole" in (tmp_path / "table").read_text()


def test_a_refused_disable_changes_nothing_later(tmp_path: Path, sock: str, cache: Cache) -> None:
    """`binfmtctl disable aarch64` while another tool's entry (Debian's, left alone) runs
    aarch64: refused (exit 5, "nothing changed"). When that entry is then removed, binfmtd
    takes aarch64 over as it would have without the refused command: its own entry, proven.
    Before, the refused disable was kept: the arch turned operator-disabled once the other
    entry went (nothing handling aarch64 binaries), and `verify` said both FAILED and
    "disabled by the operator" for it."""
    cfg = daemon_config(tmp_path, api={"socket": sock, "group": None})
    with du.running(cfg, sock, mode="compose", before=register(foreign(cache, "aarch64"))) as d:
        d.wait_verified(["s390x"])
        refused = d.ctl("disable", "aarch64")
        assert refused.returncode == 5, refused.stderr
        assert "aarch64 is not disabled (nothing changed): foreign" in refused.stderr
        verify = d.ctl("verify", "aarch64")
        assert "disabled by the operator" not in verify.stdout, verify.stdout
        d.ns_ok(f"echo -1 > {ENTRIES}/qemu-aarch64")
        rows = d.wait_verified(["aarch64"])
        assert rows["aarch64"]["interpreter"].startswith(str(tmp_path / "qemu")), rows


def test_an_obstacle_removed_from_the_install_directory_is_installed_over_at_once(
    tmp_path: Path, sock: str, cache: Cache
) -> None:
    """A directory put where binfmtd installs qemu-s390x, then binfmtd's entry removed: the
    install fails, status says what is in the way and what to do; once the operator removes
    it, binfmtd installs and proves s390x at once, though its backoff (an hour here) has not
    ended. Before, the error was a raw "[Errno 21] Is a directory: '.binfmtd-tmp-...'" and the
    fix waited out the backoff (2 s doubling to 5 min by default) with no entry for s390x."""
    source = {
        "kind": "directory",
        "path": str(tmp_path / "src"),
        "retry_initial_s": 3600,
        "retry_max_s": 3600,
    }
    cfg = config(tmp_path, sock, cache, source=source)  # makes tmp_path/src
    installed = tmp_path / "qemu" / f"qemu-{ARCH}"
    with du.running(cfg, sock) as daemon:
        daemon.wait_verified([ARCH])
        installed.unlink()
        installed.mkdir()
        daemon.ns_ok(f"echo -1 > {ENTRIES}/qemu-{ARCH}")

        def blocked() -> str | None:
            row = daemon.arch(ARCH)
            return row["error"] if row["state"] == "error" and row["error"] else None

        error = du.wait_until("the install to fail", blocked, 30)
        assert f"{installed} is in the way (Is a directory" in error, error
        assert "remove it" in error and ".binfmtd-tmp" not in error, error
        installed.rmdir()
        daemon.wait_verified([ARCH])


def test_a_reload_by_sighup_that_was_refused_shows_in_status(
    tmp_path: Path, sock: str, cache: Cache
) -> None:
    """`kill -HUP` after a bad edit (no caller to answer): status and `binfmtctl status` say
    the reload was refused, why, and that the old configuration runs, until a reload works;
    keys that wait for a restart are named there too. Before, only the log said so: status
    named the edited file as the configuration, with nothing saying it was not the one
    running."""
    cfg = config(tmp_path, sock, cache)
    good = cfg.read_text()
    with du.running(cfg, sock) as daemon:
        daemon.wait_verified([ARCH])
        cfg.write_text(good + "flags: X\n")
        daemon.signal(signal.SIGHUP)

        def warned() -> list[str]:
            return [w for w in daemon.status()["warnings"] if "reload was refused" in w]

        (warning,) = du.wait_until("the refused reload in status", warned, 30)
        assert "flags: unknown binfmt flag(s) 'X'" in warning, warning
        assert "warning: the last reload was refused" in daemon.ctl("status").stdout
        cfg.write_text(good.replace(str(tmp_path / "qemu"), str(tmp_path / "elsewhere")))
        daemon.signal(signal.SIGHUP)

        def restart_named() -> list[str]:
            return [w for w in daemon.status()["warnings"] if "until binfmtd restarts" in w]

        (waiting,) = du.wait_until("the restart-only key in status", restart_named, 30)
        assert waiting.endswith(": install_dir"), waiting
        assert not warned()
        cfg.write_text(good)
        assert daemon.ctl("reload").returncode == 0
        assert not restart_named() and not warned()


def test_an_install_directory_mounted_noexec_is_named_not_root(
    tmp_path: Path, sock: str, cache: Cache
) -> None:
    """The install directory remounted noexec (a hardening tool, a new fstab line), then
    binfmtd's entry removed: the kernel refuses the registration (with F it opens the
    interpreter for execution: EACCES), and status says the interpreter is on a noexec
    mount and what to do; after the mount goes, `binfmtctl reconcile` brings it back. Before,
    status said "permission denied: binfmtd must run as root" to a daemon running as root."""
    install = tmp_path / "qemu"
    with du.running(config(tmp_path, sock, cache), sock) as daemon:
        daemon.wait_verified([ARCH])
        daemon.ns_ok(
            f"mount --bind {install} {install} && mount -o remount,bind,noexec {install} "
            f"&& echo -1 > {ENTRIES}/qemu-{ARCH}"
        )

        def refused() -> str | None:
            row = daemon.arch(ARCH)
            return row["error"] if row["state"] == "error" and row["error"] else None

        error = du.wait_until("the registration refused", refused, 30)
        assert f"{install}/qemu-{ARCH} is on a filesystem mounted noexec" in error, error
        assert "must run as root" not in error, error
        daemon.ns_ok(f"umount {install}")
        assert daemon.ctl("reconcile").returncode == 0
        daemon.wait_verified([ARCH])


def test_verify_probes_a_disabled_arch_another_tool_now_runs(
    tmp_path: Path, sock: str, cache: Cache
) -> None:
    """s390x disabled by the operator, then another tool registers an entry (another name,
    the F flag) that catches s390x binaries: `binfmtctl verify s390x` probes what the kernel
    now runs and says FAILED (status: foreign), never "disabled by the operator (not
    probed)", which the kernel no longer is. Before, verify answered from the wish alone."""
    row = archmod.BY_NAME[ARCH]
    other = Registration("zz-other", row.magic, row.mask, "/bin/false", "F")
    with du.running(config(tmp_path, sock, cache), sock) as daemon:
        daemon.wait_verified([ARCH])
        assert daemon.ctl("disable", ARCH).returncode == 0
        daemon.ns_ok(register(other))
        du.wait_until("foreign", lambda: daemon.arch(ARCH)["state"] == "foreign", 30)
        done = daemon.ctl("verify", ARCH)
        assert done.returncode == 1, done.stdout
        assert "disabled by the operator" not in done.stdout, done.stdout
        assert f"{ARCH}: FAILED" in done.stdout, done.stdout
