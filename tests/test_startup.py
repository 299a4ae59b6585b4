"""Start-up cost: what `binfmtd --oneshot` loads, and the lazy logger it uses."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from conftest import write_config

from binfmtd import config, log

ON_DEMAND_ONLY = (
    *("prometheus_client", "h11", "structlog", "asyncio", "grpc", "google.protobuf"),
    *("psutil", "zstandard", "binfmtd.server", "binfmtd.service", "binfmtd.metrics"),
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
    metrics, structlog (asyncio), BuildKit's gRPC or psutil: they cost start-up time only."""
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
    result = subprocess.run(
        [sys.executable, "-c", FIRST_EVENTS_AT_ONCE],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["kinds"] == ["Deferred"]
    lines = [json.loads(line) for line in doc["lines"]]
    assert sorted(line["arch"] for line in lines) == [str(i) for i in range(8)]
    assert {line["event"] for line in lines} == {"emulator_installed"}
