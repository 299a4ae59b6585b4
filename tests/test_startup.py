"""Start-up cost: what `binfmtd --oneshot` loads, and the lazy logger it uses."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import daemonutil as du
from conftest import write_config
from daemonutil import SandboxSh

from binfmtd import config, log

ON_DEMAND_ONLY = (
    *("prometheus_client", "h11", "structlog", "asyncio", "grpc", "google.protobuf"),
    *("psutil", "zstandard", "binfmtd.server", "binfmtd.service", "binfmtd.metrics"),
    *("binfmtd.buildkit", "binfmtd.worker", "binfmtd.supervision", "socket", "difflib"),
)

RUN_AND_LIST = """
import json, sys
from binfmtd import daemon
code = daemon.main(["--oneshot", "--sandbox", "--json", "--config", sys.argv[1]])
heavy = sys.argv[2].split(",")
loaded = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in heavy))
print(json.dumps({"code": code, "loaded": loaded}), file=sys.stderr)
"""


def test_oneshot_loads_no_daemon_only_module(tmp_path: Path) -> None:
    """A successful `binfmtd --oneshot` provisions every arch without importing the API server,
    metrics, structlog (asyncio), BuildKit's modules (gRPC, the worker), psutil, sockets or
    the did-you-mean matcher: they cost start-up time only."""
    cfg = write_config(tmp_path, arches=["aarch64", "s390x"])
    outer = ["unshare", "--user", "--map-root-user", "--mount"]
    argv = [*outer, sys.executable, "-c", RUN_AND_LIST, str(cfg), ",".join(ON_DEMAND_ONLY)]
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False
    )
    said = json.loads(result.stderr.strip().splitlines()[-1])
    doc = json.loads(result.stdout)
    assert said == {"code": 0, "loaded": []}
    assert {row["state"] for row in doc["arches"]} == {"verified"}


GC_AFTER_ONESHOT = """
import gc, json, sys
from binfmtd import __main__, daemon
daemon._leave = lambda code: None  # the console's exit without teardown: looked at after it
sys.argv = ["binfmtd", "--oneshot", "--sandbox", "--json", "--config", sys.argv[1]]
code = __main__.main()
print(json.dumps({"code": code, "gc": gc.isenabled(), "frozen": gc.get_freeze_count() > 0}),
      file=sys.stderr)
"""
GC_WHEN_SERVING = """
import gc, json, sys
from binfmtd import __main__, service
seen = {}
def serve(cfg, **_):
    seen.update(gc=gc.isenabled(), frozen=gc.get_freeze_count() > 0)
    return 0
service.serve = serve
sys.argv = ["binfmtd", "--config", sys.argv[1]]
print(json.dumps({"code": __main__.main(), **seen}))
"""


def test_entry_point_runs_the_collector_again_once_started(tmp_path: Path) -> None:
    """`binfmtd` keeps the garbage collector off only while it starts: a --oneshot run's pass
    and the daemon's serving run with it on, start-up's objects frozen out of its scans."""
    cfg = write_config(tmp_path, arches=["s390x"])
    done = _in_user_namespace(GC_AFTER_ONESHOT, cfg)
    said = json.loads(done.stderr.strip().splitlines()[-1])
    assert said == {"code": 0, "gc": True, "frozen": True}
    serving = _in_user_namespace(GC_WHEN_SERVING, cfg)
    assert json.loads(serving.stdout) == {"code": 0, "gc": True, "frozen": True}, serving.stderr


def _in_user_namespace(code: str, cfg: Path) -> subprocess.CompletedProcess[str]:
    """`python -c code cfg` as root of a new user and mount namespace."""
    outer = ["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-c"]
    return subprocess.run(
        [*outer, code, str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )


NO_FILE_NO_YAML = """
import json, sys
from binfmtd import config
cfg = config.load(None)
print(json.dumps({"yaml": "yaml" in sys.modules, "defaults": cfg == config.Config()}))
"""


def test_start_without_a_configuration_file_does_not_load_yaml() -> None:
    """Built-in defaults (no configuration file) come without importing PyYAML (~15 ms)."""
    assert du.python_json(NO_FILE_NO_YAML) == {"yaml": False, "defaults": True}


def test_lazy_logger_sets_up_structlog_on_the_first_enabled_event() -> None:
    """configure(lazy=True): filtered events set nothing up; the first enabled one is written
    with the configured format, component and fields, like an eagerly configured logger's."""
    out = io.StringIO()
    log.configure("warning", config.LogFormat.JSON, out, lazy=True)
    try:
        logger = log.get("binfmtd.oneshot").bind(arch="s390x")
        assert isinstance(logger, log.Deferred) == ("structlog" not in sys.modules)
        assert logger.is_enabled_for(30) and not logger.is_enabled_for(20)
        logger.info("probe_passed", duration_ms=3)
        logger.debug("ignored")
        assert out.getvalue() == ""
        logger.warning("probe_failed", error="exit 1")
        line = json.loads(out.getvalue())
        assert {k: line[k] for k in ("event", "level", "component", "arch", "error")} == {
            "event": "probe_failed",
            "level": "warning",
            "component": "oneshot",
            "arch": "s390x",
            "error": "exit 1",
        }
    finally:
        log.reset()


FIRST_EVENTS_AT_ONCE = """
import io, json, sys, threading
from binfmtd import config, log
out = io.StringIO()
log.configure("info", config.LogFormat.JSON, out, lazy=True)
loggers = [log.get("binfmtd.engine") for _ in range(8)]
kinds = sorted({type(x).__name__ for x in loggers})
start = threading.Barrier(8)
def emit(i):
    start.wait()
    loggers[i].info("emulator_installed", arch=str(i))
threads = [threading.Thread(target=emit, args=(i,)) for i in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"kinds": kinds, "lines": out.getvalue().splitlines()}))
"""


def test_first_events_from_several_threads_all_use_the_configuration() -> None:
    """Install threads logging their first events at once (structlog not imported yet): every
    line is the configured JSON, none in structlog's default format on stdout."""
    doc = du.python_json(FIRST_EVENTS_AT_ONCE)
    assert doc["kinds"] == ["Deferred"]
    lines = [json.loads(line) for line in doc["lines"]]
    assert sorted(line["arch"] for line in lines) == [str(i) for i in range(8)]
    assert {line["event"] for line in lines} == {"emulator_installed"}


DAEMON_IMPORTS = """
import json, sys
import binfmtd.daemon, binfmtd.service
heavy = sys.argv[1].split(",")
loaded = [m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in heavy)]
print(json.dumps(sorted(loaded)))
"""
SCRAPE_OR_LATER_ONLY = (
    *("prometheus_client", "structlog", "asyncio", "binfmtd.supervision", "binfmtd.worker"),
    *("tomli_w", "psutil", "grpc", "http.server", "ssl", "_hashlib", "secrets", "platform"),
)


def test_daemon_modules_load_nothing_only_a_scrape_or_an_event_needs() -> None:
    """What the daemon imports before READY=1 leaves out prometheus_client (first scrape),
    structlog and asyncio (first logged event), the worker's modules, BuildKit's TOML writer
    and libcrypto (hashlib, secrets: ~3.5 MB of RSS)."""
    assert du.python_json(DAEMON_IMPORTS, ",".join(SCRAPE_OR_LATER_ONLY)) == []


LATER_THAN_IMPORT = ("binfmtd.server", "h11", "sdnotify", "inotify_simple", "ctypes")


def test_daemon_modules_leave_the_server_and_inotify_for_later() -> None:
    """Importing the daemon loads neither the API server (h11, the routes), sdnotify nor
    inotify-simple (ctypes): the first two load on a thread while the first pass waits for its
    probes, inotify-simple with the loop's Watcher after READY=1."""
    assert du.python_json(DAEMON_IMPORTS, ",".join(LATER_THAN_IMPORT)) == []


MODULE_LOGGER_FIRST = """
import io, json, sys
from binfmtd import config, log
early = log.lazy("binfmtd.server")  # made at import time, before configure
out = io.StringIO()
log.configure("warning", config.LogFormat.JSON, out, lazy=True)
early.info("api_listening", path="/x")
quiet = "structlog" not in sys.modules
early.warning("api_accept_failed", errno=24)
print(json.dumps({"quiet": quiet, "lines": out.getvalue().splitlines()}))
"""


def test_module_level_lazy_logger_follows_the_later_configuration() -> None:
    """A logger made at import time (before `configure`) filters by the configured level
    without importing structlog, then writes the configured JSON with its component."""
    doc = du.python_json(MODULE_LOGGER_FIRST)
    assert doc["quiet"] is True
    [line] = [json.loads(text) for text in doc["lines"]]
    assert {k: line[k] for k in ("event", "level", "component", "errno")} == {
        "event": "api_accept_failed",
        "level": "warning",
        "component": "server",
        "errno": 24,
    }


RESTART_AFTER_METADATA_CHANGE = """
"$BINFMTD" --oneshot --json --config "$CFG" > "$TMP/first.json"
for arch in s390x aarch64; do
    ln "$SRC/qemu-$arch-static" "$SRC/extra-name"  # a link made and removed: ctime moves
    rm "$SRC/extra-name"
    chmod 0755 "$TMP/qemu/qemu-$arch"  # the same mode again: ctime moves, bytes do not
done
"$BINFMTD" --oneshot --json --config "$CFG" > "$TMP/second.json"
"""


def test_restart_records_the_identity_of_files_whose_metadata_moved(
    sandbox_sh: SandboxSh, qemu_dir: Path, tmp_path: Path
) -> None:
    """Installed emulators whose ctime moved (a hard link to the source made and removed, a
    chmod) are hashed again by the next start (several at once), which keeps them (no
    reinstall) and records their new identity in the state file, so the start after that
    does not read their bytes again."""
    src = tmp_path / "src"
    src.mkdir()
    arches = ["s390x", "aarch64"]
    for arch in arches:
        shutil.copy2(qemu_dir / f"qemu-{arch}-static", src / f"qemu-{arch}-static")
    cfg = write_config(tmp_path, arches=arches, source={"kind": "directory", "path": str(src)})
    env = {"CFG": str(cfg), "SRC": str(src), "TMP": str(tmp_path)}
    done = sandbox_sh(RESTART_AFTER_METADATA_CHANGE, env=env)
    assert done.returncode == 0, done.stderr
    second = json.loads((tmp_path / "second.json").read_text(encoding="utf-8"))
    assert [row["state"] for row in second["arches"]] == ["verified", "verified"]
    assert second["actions"] == []
    record = json.loads((tmp_path / "state" / "state.json").read_text(encoding="utf-8"))
    for arch in arches:
        st = os.lstat(tmp_path / "qemu" / f"qemu-{arch}")
        now = f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_mode}:{st.st_uid}"
        assert record["emulators"][arch]["file_id"] == now, arch


FAKE_DPKG_QUERY = """#!/bin/sh
echo "$*" >> {log}
exec {real} "$@"
"""


def test_package_lookup_runs_once_on_a_cold_start_and_never_on_a_warm_one(
    tmp_path: Path, sandbox_sh: SandboxSh, qemu_dir: Path
) -> None:
    """The cold `binfmtd --oneshot` asks dpkg-query about every emulator it installs, in one
    lookup started before the pass; a second run finds them all installed and asks nothing.
    The cache's files belong to no package: the state says so (no package recorded).

    binfmtd runs dpkg-query from the system's PATH only, so the witness is mounted over
    /usr/bin/dpkg-query in the test's own mount namespace."""
    real, fake, calls = tmp_path / "real", tmp_path / "fake", tmp_path / "dpkg-calls"
    shutil.copy2("/usr/bin/dpkg-query", real)
    fake.write_text(FAKE_DPKG_QUERY.format(log=calls, real=real), encoding="utf-8")
    fake.chmod(0o755)
    arches = ["aarch64", "s390x", "riscv64"]
    cfg = write_config(tmp_path, arches=arches)
    witness = f"mount --bind {fake} /usr/bin/dpkg-query\n"
    runs = []
    for _ in range(2):
        run = sandbox_sh(witness + f'"$BINFMTD" --oneshot --json --config {cfg}')
        assert run.returncode == 0, run.stderr
        runs.append(json.loads(run.stdout))
        lines = calls.read_text(encoding="utf-8").splitlines() if calls.exists() else []
        runs[-1]["asked"] = lines
        calls.unlink(missing_ok=True)
    cold, warm = runs
    (asked,) = cold["asked"]
    assert asked.split()[0] == "-S"
    assert sorted(asked.split()[1:]) == sorted(f"{qemu_dir}/qemu-{a}-static" for a in arches)
    assert warm["asked"] == []
    state = json.loads((tmp_path / "state" / "state.json").read_text(encoding="utf-8"))
    assert {a: state["emulators"][a].get("package") for a in arches} == dict.fromkeys(arches)
