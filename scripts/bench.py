#!/usr/bin/env python3
"""binfmtd's benchmark: each figure next to a baseline measured in the same run.

Everything that registers runs in private binfmt_misc instances (`binfmtd --sandbox`, or
`unshare --user --map-root-user --mount` with its own mount): the host's binfmt_misc is never
written. Network: Unix sockets only. Run it through `./scripts/bench [--quick]`; the results
are printed as a table and written to bench-results/bench.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import random
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python")
BINFMTD = str(VENV_BIN / "binfmtd")
BINFMTCTL = str(VENV_BIN / "binfmtctl")
CACHE = Path(os.environ.get("BINFMTD_CACHE", REPO / "cache"))
QEMU_DIR = CACHE / "qemu" / "usr" / "bin"
BINFMT_D = CACHE / "qemu" / "usr" / "lib" / "binfmt.d"
FAKE_BUILDKITD = REPO / "tests" / "fake_buildkitd"
SYSTEMD_BINFMT = "/lib/systemd/systemd-binfmt"
BINFMT_ROOT = "/proc/sys/fs/binfmt_misc"
BUSYBOX_ARCHES = ("arm64", "armhf", "armel", "ppc64el", "s390x", "mips64el", "mipsel", "i386")
PRELUDE = (
    f"set -euo pipefail\nmount --make-rprivate /\nmount -t binfmt_misc binfmt_misc {BINFMT_ROOT}\n"
)
STATUS_REQUEST = b"GET /v1/status HTTP/1.1\r\nHost: bench\r\n\r\n"
# The clients' read size. 256 KiB (what they used before) is above glibc's mmap threshold: every
# recv() then mmap'd and munmap'd its buffer, and the load clients spent about as much CPU per
# answer as the server (on 2 cores they share), which halved the throughput measured for any
# server with answers larger than a few bytes. 64 KiB holds a whole status (about 18 KB).
RECV_SIZE = 1 << 16
BUILDKIT_ADDS = {"linux/amd64/v2", "linux/amd64/v3", "linux/amd64/v4"}

BASELINE_COLD = (
    "inside `unshare --user --map-root-user --mount` with a private binfmt_misc: "
    "`systemd-binfmt` applies Debian's {n} qemu-*.conf from qemu-user-static, rewritten to "
    "point at the cache's qemu-*-static with flags F (nothing copied, nothing checksummed), "
    "then one real Debian busybox-static (`busybox uname -m`) runs per arch that has one "
    "({arches}; i386 runs natively)"
)


# ------------------------------------------------------------------------ plan and results


@dataclass(frozen=True)
class Plan:
    """How much of everything to do: `--quick` or the full run."""

    quick: bool
    cold_runs: int
    warm_runs: int
    register_runs: int
    load_s: float
    ctl_runs: int
    idle_s: float
    flushes: int
    worker_runs: int
    removals: int

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            # register_runs: one run is under a millisecond, and its median moves with any
            # other load by more than the target's margin: 40 runs, not 10, even when quick.
            return cls(True, 3, 3, 40, 2.0, 10, 15.0, 10, 2, 10)
        return cls(False, 7, 7, 100, 5.0, 30, 60.0, 50, 5, 30)


@dataclass
class Row:
    """One figure: our median next to the baseline's, and whether the target holds."""

    key: str
    figure: str
    unit: str
    ours: float | None
    baseline: float | None
    target: str = "-"
    met: bool | None = None
    note: str = ""
    ratio: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.ours is not None and self.baseline:
            self.ratio = round(self.ours / self.baseline, 3)


def median(values: list[float]) -> float:
    """The median, rounded for the table."""
    return round(statistics.median(values), 3)


def pct(values: list[float], p: float) -> float:
    """The nearest-rank percentile p (0..100) of `values`."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def log(text: str) -> None:
    """Progress on stderr, so stdout holds only the table."""
    print(f"bench: {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ helpers


def write_config(path: Path, work: Path, **overrides: Any) -> str:
    """A binfmtd config (JSON is YAML) with every path under `work`."""
    work.mkdir(parents=True, exist_ok=True)
    body: dict[str, Any] = {
        "install_dir": str(work / "qemu"),
        "state_file": str(work / "state.json"),
        "lock_file": str(work / "binfmtd.lock"),
        "source": {"kind": "directory", "path": str(QEMU_DIR)},
        "log": {"level": "warning", "format": "json"},
        "api": {"socket": str(work / "api.sock"), "group": None},
    }
    body.update(overrides)
    path.write_text(json.dumps(body, indent=2), encoding="utf-8")
    path.chmod(0o644)
    return str(path)


def sandboxed(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run argv in a new user+mount namespace with its own binfmt_misc instance."""
    script = PRELUDE + 'exec "$@"\n'
    return subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script, "bench", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def checked(result: subprocess.CompletedProcess[str], what: str) -> str:
    """stdout of a command that must have succeeded."""
    if result.returncode != 0:
        raise RuntimeError(f"{what} exited {result.returncode}: {result.stderr.strip()[-2000:]}")
    return result.stdout


def wait_ready(sock: socket.socket, proc: subprocess.Popen[bytes], timeout: float) -> float:
    """perf_counter() when READY=1 arrived on the NOTIFY_SOCKET datagram socket."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(0.2)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            if proc.poll() is not None:
                raise RuntimeError(f"binfmtd exited {proc.returncode} before READY=1") from None
            continue
        if b"READY=1" in data.split(b"\n"):
            return time.perf_counter()
    raise RuntimeError("no READY=1 within the timeout")


def notify_socket(path: Path) -> socket.socket:
    """A bound AF_UNIX datagram socket, as systemd's NOTIFY_SOCKET."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    return sock


@dataclass
class Daemon:
    """A running binfmtd (the Popen pid is the daemon: --sandbox unshares in-process)."""

    proc: subprocess.Popen[bytes]
    socket: str
    ready_ms: float

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_daemon(cfg: str, work: Path, name: str, sandbox: bool = True) -> Daemon:
    """Start binfmtd and wait for READY=1 on a real NOTIFY_SOCKET."""
    notify_path = work / f"{name}.notify"
    sock = notify_socket(notify_path)
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C.UTF-8"}
    env["NOTIFY_SOCKET"] = str(notify_path)
    argv = [BINFMTD, "--config", cfg, *(["--sandbox"] if sandbox else [])]
    with open(work / f"{name}.log", "ab") as logfile:
        started = time.perf_counter()
        proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile
        )
    try:
        ready = wait_ready(sock, proc, timeout=180)
    except BaseException:
        proc.kill()
        raise
    finally:
        sock.close()
    api = json.loads(Path(cfg).read_text(encoding="utf-8"))["api"]["socket"]
    return Daemon(proc, api, (ready - started) * 1000)


# ------------------------------------------------------------------------ HTTP over AF_UNIX


class Client:
    """A blocking keep-alive HTTP/1.1 client (for polling, not for load)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.buf = b""

    def get(self, target: str) -> Any:
        self.sock.sendall(f"GET {target} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
        while len(rest) < length:
            rest += self._recv()
        self.buf = rest[length:]
        return json.loads(rest[:length])

    def _recv(self) -> bytes:
        chunk = self.sock.recv(RECV_SIZE)
        if not chunk:
            raise ConnectionError("server closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------------ 1. cold provision


def baseline_confs(dest: Path) -> list[Path]:
    """Debian's qemu confs, interpreter rewritten to the cache's static QEMU, flags F."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for conf in sorted(BINFMT_D.glob("qemu-*.conf")):
        fields = conf.read_text(encoding="latin-1").strip().split(":")
        arch = fields[1].removeprefix("qemu-")
        fields[6], fields[7] = str(QEMU_DIR / f"qemu-{arch}-static"), "F"
        target = dest / conf.name
        target.write_text(":".join(fields) + "\n", encoding="latin-1")
        out.append(target)
    return out


BASELINE_SCRIPT = """
s=$EPOCHREALTIME
{systemd_binfmt} "$@"
r=$EPOCHREALTIME
for a in {arches}; do "$CACHE/busybox/$a/bin/busybox" uname -m >/dev/null; done
v=$EPOCHREALTIME
n=$(ls {root} | grep -cv '^register$\\|^status$')
echo "$s $r $v $n"
"""


def baseline_once(confs: list[Path]) -> dict[str, float]:
    """One run of the composed baseline; milliseconds per phase and the whole command."""
    script = PRELUDE + BASELINE_SCRIPT.format(
        systemd_binfmt=SYSTEMD_BINFMT, arches=" ".join(BUSYBOX_ARCHES), root=BINFMT_ROOT
    )
    argv = ["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script, "baseline"]
    started = time.perf_counter()
    result = subprocess.run(
        [*argv, *map(str, confs)],
        capture_output=True,
        text=True,
        env={**os.environ, "CACHE": str(CACHE)},
        stdin=subprocess.DEVNULL,
        check=False,
    )
    wall = (time.perf_counter() - started) * 1000
    s, r, v, n = checked(result, "baseline").split()
    if int(n) != len(confs):
        raise RuntimeError(f"baseline registered {n} entries, expected {len(confs)}")
    register, verify = (float(r) - float(s)) * 1000, (float(v) - float(r)) * 1000
    return {
        "install": 0.0,
        "register": register,
        "verify": verify,
        "total": register + verify,
        "wall": wall,
    }


# The floor of a cold provision: what any tool must do to meet the brief's rules for these
# emulators (read and hash each once with BLAKE3, put it in place by hard link, register it
# with F, run its probe through the kernel), with nothing else: no checks of trust or ELF
# headers, no state file, no package lookup, no status. One Python process (the language
# binfmtd is written in) with 2 threads per CPU, each arch hashed, linked, registered and probed
# in turn. argv: a jobs file (arch TAB source TAB register line with @DEST@ TAB probe), the
# empty destination directory, the thread count. Prints "proven failed".
FLOOR_COLD = """
import mmap, os, sys, threading, blake3
jobs = [line.split("\\t") for line in open(sys.argv[1]).read().splitlines()]
dest, threads = sys.argv[2], int(sys.argv[3])
devnull = os.open("/dev/null", os.O_WRONLY)
register = os.open("/proc/sys/fs/binfmt_misc/register", os.O_WRONLY)
lock, failed, order = threading.Lock(), [], iter(jobs)
def work():
    buf = mmap.mmap(-1, 1 << 20)
    while True:
        with lock:
            job = next(order, None)
        if job is None:
            return
        arch, source, line, probe = job
        fd = os.open(source, os.O_RDONLY)
        digest, offset = blake3.blake3(), 0
        while count := os.preadv(fd, [buf], offset):
            digest.update(memoryview(buf)[:count])
            offset += count
        os.close(fd)
        os.link(source, os.path.join(dest, "qemu-" + arch))
        os.write(register, line.replace("@DEST@", dest).encode())
        pid = os.posix_spawn(probe, [probe], {}, file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 1)])
        if os.waitpid(pid, 0)[1] != 0:
            failed.append(arch)
pool = [threading.Thread(target=work) for _ in range(threads)]
for t in pool:
    t.start()
for t in pool:
    t.join()
print(len(jobs) - len(failed), len(failed))
"""

# The floor of a flush repair: flush, write every register line again on one descriptor, run
# every probe through the kernel (CPUs + 1 at a time, as binfmtd's probe.workers_for), nothing
# else. argv: a jobs file (register line TAB probe), rounds, probes at once. Prints the
# milliseconds of each round (flush to the last probe's exit) as JSON.
FLOOR_REPAIR = """
import json, os, sys, time
jobs = [line.split("\\t") for line in open(sys.argv[1]).read().splitlines()]
rounds, at_once = int(sys.argv[2]), int(sys.argv[3])
root = "/proc/sys/fs/binfmt_misc"
devnull = os.open("/dev/null", os.O_WRONLY)
def write(name, data):
    fd = os.open(root + "/" + name, os.O_WRONLY)
    for chunk in data:
        os.write(fd, chunk)
    os.close(fd)
write("register", [line.encode() for line, _ in jobs])
times = []
for _ in range(rounds):
    time.sleep(0.05)
    started = time.perf_counter()
    write("status", [b"-1"])
    write("register", [line.encode() for line, _ in jobs])
    todo, running, failed = [probe for _, probe in jobs], 0, 0
    while todo or running:
        while todo and running < at_once:
            probe = todo.pop()
            os.posix_spawn(probe, [probe], {}, file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 1)])
            running += 1
        failed += os.wait()[1] != 0
        running -= 1
    if failed:
        raise SystemExit(f"{failed} probes failed")
    times.append((time.perf_counter() - started) * 1000)
print(json.dumps(times))
"""


def floor_probes(work: Path, arches: list[str]) -> dict[str, str]:
    """{arch: a copy of binfmtd's probe for it, mode 0755} (the repository's may be 0644)."""
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for arch in arches:
        target = work / arch
        if not target.exists():
            target.write_bytes((REPO / "binfmtd" / "probes" / arch).read_bytes())
            target.chmod(0o755)
        out[arch] = str(target)
    return out


def floor_cold_jobs(provisioned: Path, work: Path) -> Path:
    """The floor's jobs file, from what a cold provision recorded: every arch's source file and
    register line (the interpreter moved to @DEST@), in the order binfmtd registered them."""
    state = json.loads((provisioned / "state.json").read_text(encoding="utf-8"))
    install_dir = str(provisioned / "qemu")
    probes = floor_probes(work / "probes", [n.removeprefix("qemu-") for n in state["entries"]])
    lines = []
    for name, line in state["entries"].items():
        arch = name.removeprefix("qemu-")
        origin = state["emulators"][arch]["origin"]
        lines.append(f"{arch}\t{origin}\t{line.replace(install_dir, '@DEST@')}\t{probes[arch]}")
    jobs = work / "floor-cold.jobs"
    jobs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return jobs


def floor_cold_once(jobs: Path, dest: Path) -> float:
    """One run of the cold floor (FLOOR_COLD) in a fresh private instance: wall milliseconds."""
    dest.mkdir(parents=True)
    threads = 2 * (os.cpu_count() or 1)
    script = PRELUDE + 'exec "$@"\n'
    argv = ["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script, "floor"]
    started = time.perf_counter()
    result = subprocess.run(
        [*argv, PYTHON, "-c", FLOOR_COLD, str(jobs), str(dest), str(threads)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    wall = (time.perf_counter() - started) * 1000
    _proven, failed = checked(result, "cold floor").split()
    if int(failed):
        raise RuntimeError(f"cold floor: {failed} probes failed")
    subprocess.run(["rm", "-rf", str(dest)], check=True)
    return wall


def cold_once(work: Path, source: dict[str, str]) -> dict[str, float]:
    """`binfmtd --oneshot --sandbox --json` with an empty install dir: milliseconds."""
    cfg = write_config(work / "binfmtd.yaml", work, source=source)
    started = time.perf_counter()
    result = subprocess.run(
        [BINFMTD, "--oneshot", "--sandbox", "--json", "--config", cfg],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    wall = (time.perf_counter() - started) * 1000
    report = json.loads(checked(result, "binfmtd --oneshot"))
    states = {a["state"] for a in report["arches"]}
    if states != {"verified"}:
        raise RuntimeError(f"cold provision left states {states}")
    return {**report["durations_ms"], "wall": wall, "arches": len(report["arches"])}


def bench_cold(plan: Plan, work: Path, raw: dict[str, Any]) -> list[Row]:
    """Row 1: cold provision, ours against the composed baseline, interleaved."""
    confs = baseline_confs(work / "baseline-confs")
    ours, base, floor = [], [], []
    jobs = None
    for i in range(plan.cold_runs):
        run_dir = work / f"cold-{i}"
        os.sync()  # the last run's writeback must not land in this one
        ours.append(cold_once(run_dir, {"kind": "directory", "path": str(QEMU_DIR)}))
        jobs = jobs or floor_cold_jobs(run_dir, work / "floor")
        if i < plan.cold_runs - 1:
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        os.sync()
        base.append(baseline_once(confs))
        os.sync()
        floor.append(floor_cold_once(jobs, work / "floor" / f"dest-{i}"))
        log(
            f"cold {i + 1}/{plan.cold_runs}: ours {ours[-1]['wall']:.0f} ms, "
            f"baseline {base[-1]['wall']:.0f} ms, floor {floor[-1]:.0f} ms"
        )
    raw["provisioned_dir"] = str(work / f"cold-{plan.cold_runs - 1}")
    deb = sorted((CACHE / "debs").glob("qemu-user-static_*.deb"))[0]
    deb_run = cold_once(work / "cold-deb", {"kind": "deb", "path": str(deb)})
    subprocess.run(["rm", "-rf", str(work / "cold-deb")], check=True)
    raw["cold"] = {"ours": ours, "baseline": base, "floor": floor, "deb": deb_run}
    arches = int(ours[0]["arches"])
    raw["baseline_cold"] = BASELINE_COLD.format(n=len(confs), arches=", ".join(BUSYBOX_ARCHES))
    rows = [
        Row(
            f"cold.{phase}",
            f"cold provision ({arches} arches, directory): {phase}",
            "ms",
            median([r[phase] for r in ours]),
            median([r[phase] for r in base]),
        )
        for phase in ("install", "register", "verify")
    ]
    o, b = median([r["total"] for r in ours]), median([r["total"] for r in base])
    rows.append(Row("cold.total", "cold provision: total (in-process)", "ms", o, b))
    o, b = median([r["wall"] for r in ours]), median([r["wall"] for r in base])
    rows.append(
        Row("cold.wall", "cold provision: wall, whole command", "ms", o, b, "<= 2.5x", o <= 2.5 * b)
    )
    f = median(floor)
    rows.append(
        Row(
            "cold.floor",
            "cold provision floor: hash, link, register, probe",
            "ms",
            f,
            b,
            note="a bare script, whole command (see FLOOR_COLD); baseline: the composed one",
        )
    )
    rows.append(Row("cold.over_floor", "cold provision: ours against the floor", "ms", o, f))
    rows.append(
        Row(
            "cold.deb.total",
            "cold provision, .deb source: total",
            "ms",
            deb_run["total"],
            None,
            note=f"wall {deb_run['wall']:.0f} ms; install {deb_run['install']} ms (one run)",
        )
    )
    return rows


# ------------------------------------------------------------------ 2. warm start, 3. register


def inner_warm(cfg: str, runs: int, work: str) -> None:
    """(In a private instance.) Start the daemon runs+1 times; the first start is cold."""
    times = []
    for i in range(runs + 1):
        daemon = start_daemon(cfg, Path(work), "warm", sandbox=False)
        times.append(daemon.ready_ms)
        daemon.stop()
        if daemon.proc.returncode != 0:
            raise RuntimeError(f"daemon start {i} exited {daemon.proc.returncode}")
    print(json.dumps({"cold": times[0], "warm": times[1:]}))


def bench_warm(plan: Plan, work: Path, raw: dict[str, Any]) -> list[Row]:
    """Row 2: exec to READY=1 when everything is installed and registered already."""
    wdir = work / "warm"
    cfg = write_config(wdir / "binfmtd.yaml", wdir)
    inner = [PYTHON, __file__, "--inner", "warm", cfg, str(plan.warm_runs), str(wdir)]
    result = json.loads(checked(sandboxed(inner, timeout=600), "warm start"))
    raw["warm"] = result
    ours = median(result["warm"])
    log(f"warm start: {result['warm']}")
    return [
        Row(
            "warm.ready",
            "warm start: exec to READY=1",
            "ms",
            ours,
            None,
            "<= 300 ms",
            ours <= 300,
            note=f"first (cold) start {result['cold']:.0f} ms",
        )
    ]


def inner_register(cfg_path: str, runs: int) -> None:
    """(In a private instance.) Our engine's register phase against a bare write loop."""
    from binfmtd import config
    from binfmtd import log as binlog
    from binfmtd import plan as planmod
    from binfmtd.engine import Engine, TickReport

    cfg = config.load(cfg_path)
    binlog.configure("warning", "json")
    engine = Engine(cfg, binlog.get("bench"))
    engine.detect_native()
    ours, floor = [], []
    for _ in range(runs):
        flush_instance()
        observed = engine.observe()
        desired = {a: planmod.Desired(a, engine.registration(a), True) for a in engine.selected}
        actions = planmod.plan(desired, engine.world(observed), engine.replace)
        if not actions or not all(isinstance(a, planmod.Register) for a in actions):
            raise RuntimeError(f"expected only Register actions, got {actions[:3]}")
        strings = [a.reg.register_string().encode() for a in actions]
        started = time.perf_counter()
        engine.execute(actions, TickReport())
        ours.append((time.perf_counter() - started) * 1000)
        flush_instance()
        started = time.perf_counter()
        fd = os.open(f"{BINFMT_ROOT}/register", os.O_WRONLY)
        for line in strings:
            os.write(fd, line)
        os.close(fd)
        floor.append((time.perf_counter() - started) * 1000)
    print(json.dumps({"ours": ours, "floor": floor, "entries": len(strings)}))


def flush_instance() -> None:
    """Remove every entry of the (private) instance."""
    fd = os.open(f"{BINFMT_ROOT}/status", os.O_WRONLY)
    os.write(fd, b"-1")
    os.close(fd)


def bench_register(plan: Plan, work: Path, raw: dict[str, Any]) -> list[Row]:
    """Row 3: registering every arch, our engine against the kernel floor."""
    provisioned = Path(raw.get("provisioned_dir") or work / "register")
    if not (provisioned / "state.json").exists():
        cold_once(provisioned, {"kind": "directory", "path": str(QEMU_DIR)})
    cfg = write_config(provisioned / "register.yaml", provisioned)
    inner = [PYTHON, __file__, "--inner", "register", cfg, str(plan.register_runs)]
    result = json.loads(checked(sandboxed(inner), "register"))
    raw["register"] = result
    ours, floor = median(result["ours"]), median(result["floor"])
    return [
        Row(
            "register.phase",
            f"register phase, {result['entries']} entries",
            "ms",
            ours,
            floor,
            "<= 1.5x",
            ours <= 1.5 * floor,
            note="baseline: one open(register) + a write(2) per precomputed line",
        )
    ]


# ------------------------------------------------------------------------ 4. status under load


def load_worker(path: str, conns: int, duration: float, limit: int, go: Any, out: Any) -> None:
    """One client process: `conns` keep-alive connections, one request outstanding on each."""
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(conns):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        sock.setblocking(False)
        socks.append(sock)
    go.wait()
    lat = array("d")
    bad = 0
    start = time.perf_counter()
    deadline = start + duration
    for sock in socks:
        sel.register(sock, selectors.EVENT_READ, [sock, bytearray(), time.perf_counter()])
        sock.send(STATUS_REQUEST)
    active = conns
    while active:
        events = sel.select(timeout=10)
        if not events:
            raise RuntimeError("load: no answer within 10 s")
        for key, _ in events:
            state = key.data
            sock, buf = state[0], state[1]
            chunk = sock.recv(RECV_SIZE)
            if not chunk:
                raise RuntimeError("load: the server closed a connection")
            buf += chunk
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                continue
            at = buf.find(b"Content-Length: ", 0, end) + 16
            total = end + 4 + int(buf[at : buf.find(b"\r\n", at)])
            if len(buf) < total:
                continue
            bad += buf[9:12] != b"200"
            del buf[:total]
            now = time.perf_counter()
            lat.append(now - state[2])
            if now < deadline and len(lat) < limit:
                state[2] = now
                sock.send(STATUS_REQUEST)
            else:
                sel.unregister(sock)
                sock.close()
                active -= 1
    out.send((start, time.perf_counter(), bad, lat.tobytes()))
    out.close()


def run_load(path: str, clients: int, duration: float) -> dict[str, float]:
    """`clients` connections spread over processes; p50/p99 in ms and requests/s."""
    ctx = multiprocessing.get_context("fork")
    procs = min(clients, os.cpu_count() or 2)
    go = ctx.Event()
    limit = 2_000_000 // procs
    workers, pipes = [], []
    for i in range(procs):
        share = clients // procs + (1 if i < clients % procs else 0)
        recv_end, send_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=load_worker, args=(path, share, duration, limit, go, send_end))
        proc.start()
        workers.append(proc)
        pipes.append(recv_end)
    time.sleep(0.3)
    go.set()
    results = [pipe.recv() for pipe in pipes]
    for proc in workers:
        proc.join()
    lat: list[float] = []
    for _, _, _, blob in results:
        lat.extend(array("d", blob))
    span = max(r[1] for r in results) - min(r[0] for r in results)
    return {
        "p50_ms": round(pct(lat, 50) * 1000, 3),
        "p99_ms": round(pct(lat, 99) * 1000, 3),
        "rps": round(len(lat) / span),
        "requests": len(lat),
        "non_200": sum(r[2] for r in results),
    }


FLOOR_BODY = b'{"platforms":["linux/amd64","linux/arm64"],"ok":true}\n'


def inner_floor_server(path: str) -> None:
    """The baseline: a trivial stdlib server, one selectors loop, a fixed small JSON body."""
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(FLOOR_BODY)}\r\nConnection: keep-alive\r\n\r\n".encode()
        + FLOOR_BODY
    )
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(512)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    while True:
        for key, _ in sel.select():
            if key.data is None:
                conn, _ = listener.accept()
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ, bytearray())
                continue
            conn, buf = key.fileobj, key.data
            data = conn.recv(65536)  # type: ignore[union-attr]
            if not data:
                sel.unregister(conn)
                conn.close()  # type: ignore[union-attr]
                continue
            buf += data
            count = buf.count(b"\r\n\r\n")
            if count:
                del buf[: buf.rfind(b"\r\n\r\n") + 4]
                conn.sendall(answer * count)  # type: ignore[union-attr]


@contextlib.contextmanager
def floor_server(work: Path) -> Iterator[str]:
    """The baseline server, running in its own process."""
    path = str(work / "floor.sock")
    proc = subprocess.Popen([PYTHON, __file__, "--inner", "floor-server", path])
    try:
        for _ in range(200):
            if os.path.exists(path):
                break
            time.sleep(0.02)
        yield path
    finally:
        proc.kill()
        proc.wait()


def bench_load(plan: Plan, daemon: Daemon, work: Path, raw: dict[str, Any]) -> list[Row]:
    """Row 4: GET /v1/status at 1 and 64 clients, ours against the floor server."""
    results: dict[str, dict[str, float]] = {}
    with floor_server(work) as floor_path:
        for clients in (1, 64):
            results[f"ours-{clients}"] = run_load(daemon.socket, clients, plan.load_s)
            results[f"floor-{clients}"] = run_load(floor_path, clients, plan.load_s)
            log(
                f"load {clients}: ours {results[f'ours-{clients}']}, "
                f"floor {results[f'floor-{clients}']}"
            )
    raw["load"] = results
    rows = []
    for clients in (1, 64):
        o, b = results[f"ours-{clients}"], results[f"floor-{clients}"]
        p99_target = ("<= 5 ms", o["p99_ms"] <= 5) if clients == 64 else ("-", None)
        rps_target = (">= 5000/s", o["rps"] >= 5000) if clients == 64 else ("-", None)
        rows += [
            Row(
                f"status.c{clients}.p50",
                f"GET /v1/status, {clients} client(s): p50",
                "ms",
                o["p50_ms"],
                b["p50_ms"],
            ),
            Row(
                f"status.c{clients}.p99",
                f"GET /v1/status, {clients} client(s): p99",
                "ms",
                o["p99_ms"],
                b["p99_ms"],
                *p99_target,
            ),
            Row(
                f"status.c{clients}.rps",
                f"GET /v1/status, {clients} client(s): throughput",
                "req/s",
                o["rps"],
                b["rps"],
                *rps_target,
                note="higher is better",
            ),
        ]
    return rows


# ------------------------------------------------------------------------ 5. binfmtctl


def timed(argv: list[str]) -> float:
    """Wall milliseconds of one command that must succeed."""
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    return (time.perf_counter() - started) * 1000


def bench_ctl(plan: Plan, daemon: Daemon, raw: dict[str, Any]) -> list[Row]:
    """Row 5: `binfmtctl platforms` against the interpreter starting and importing json+socket."""
    ctl = [BINFMTCTL, "--socket", daemon.socket, "platforms"]
    floor = [PYTHON, "-I", "-c", "import json, socket"]
    timed(ctl), timed(floor)  # warm the page cache
    ours, base = [], []
    for _ in range(plan.ctl_runs):
        ours.append(timed(ctl))
        base.append(timed(floor))
    raw["ctl"] = {"ours": ours, "baseline": base}
    o, b = median(ours), median(base)
    return [
        Row(
            "ctl.platforms",
            "`binfmtctl platforms` wall time",
            "ms",
            o,
            b,
            "<= 1.5x",
            o <= 1.5 * b,
            note="baseline: python -I -c 'import json, socket' (the venv's python)",
        )
    ]


# ------------------------------------------------------------------------ 6. idle cost


def bench_idle(plan: Plan, daemon: Daemon, raw: dict[str, Any]) -> list[Row]:
    """Row 6: CPU % of one core and RSS while idle, against a sleeping python.

    The RSS target is the daemon's own figure before the metrics moved to prometheus_client
    (about 28 MB: issue 14 asks for RSS unchanged), not a loose ceiling: "<= 30 MB". It is
    taken before any scrape; the first `GET /metrics` imports prometheus_client (its
    exposition loads an HTTP server, urllib, email), so the RSS after one scrape is
    measured too and shown in the note."""
    import psutil

    sleeper = subprocess.Popen(
        [PYTHON, "-c", f"import time; time.sleep({plan.idle_s + 30})"], stdin=subprocess.DEVNULL
    )
    try:
        time.sleep(1.0)
        procs = {"ours": psutil.Process(daemon.proc.pid), "baseline": psutil.Process(sleeper.pid)}
        before = {k: _cpu(p) for k, p in procs.items()}
        started = time.monotonic()
        peak = dict.fromkeys(procs, 0)
        while time.monotonic() - started < plan.idle_s:
            time.sleep(1.0)
            for k, p in procs.items():
                peak[k] = max(peak[k], p.memory_info().rss)
        elapsed = time.monotonic() - started
        cpu = {k: (_cpu(p) - before[k]) / elapsed * 100 for k, p in procs.items()}
        scraped = _rss_after_scrape(daemon, procs["ours"])
    finally:
        sleeper.kill()
        sleeper.wait()
    mb = {k: v / 2**20 for k, v in peak.items()}
    raw["idle"] = {
        "seconds": elapsed,
        "cpu_percent": cpu,
        "rss_mb_peak": mb,
        "rss_mb_after_one_scrape": scraped,
    }
    return [
        Row(
            "idle.cpu",
            f"idle CPU over {plan.idle_s:g} s (default configuration)",
            "% of a core",
            round(cpu["ours"], 3),
            round(cpu["baseline"], 3),
            "<= 0.1 %",
            cpu["ours"] <= 0.1,
            note="baseline: python -c 'import time; time.sleep(...)'",
        ),
        Row(
            "idle.rss",
            "idle RSS (peak, before any scrape)",
            "MB",
            round(mb["ours"], 1),
            round(mb["baseline"], 1),
            f"<= {IDLE_RSS_MB} MB",
            mb["ours"] <= IDLE_RSS_MB,
            note=f"RSS unchanged (~28 MB before prometheus_client); {scraped:.1f} MB after one "
            "/metrics scrape (prometheus_client is imported by the first)",
        ),
    ]


IDLE_RSS_MB = 30


def _rss_after_scrape(daemon: Daemon, proc: Any) -> float:
    """The daemon's RSS (MB) after one `GET /metrics` on its API socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(daemon.socket)
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        while sock.recv(1 << 16):
            pass
    return round(float(proc.memory_info().rss) / 2**20, 1)


def _cpu(proc: Any) -> float:
    """CPU seconds of `proc` and its live descendants (the daemon's probe runner), every thread,
    from /proc/PID/task/TID/schedstat (nanoseconds: `cpu_times()` counts 10 ms ticks, and the
    0.1 % target over a quick 15 s window is 15 ms, under two ticks); plus what reaped children
    used (ticks)."""
    total = 0.0
    for one in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{one.pid}/task"):
                with open(f"/proc/{one.pid}/task/{tid}/schedstat", encoding="ascii") as f:
                    total += int(f.read().split()[0]) / 1e9
    times = proc.cpu_times()
    return total + float(times.children_user + times.children_system)


# ------------------------------------------------------------------------ 7. repair latency

FLUSHER = (
    "import os, sys, time\n"
    "for _ in sys.stdin:\n"
    f"    fd = os.open('{BINFMT_ROOT}/status', os.O_WRONLY)\n"
    "    at = time.time()\n"
    "    os.write(fd, b'-1')\n"
    "    os.close(fd)\n"
    "    print(repr(at), flush=True)\n"
)


def bench_repair(plan: Plan, daemon: Daemon, raw: dict[str, Any]) -> list[Row]:
    """Row 7: external flush of the daemon's instance to every arch restored and re-verified."""
    argv = ["nsenter", "--target", str(daemon.proc.pid), "--user", "--mount", PYTHON, "-c", FLUSHER]
    flusher = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert flusher.stdin is not None and flusher.stdout is not None
    client = Client(daemon.socket)
    seen, done = [], []
    try:
        for _ in range(plan.flushes):
            time.sleep(random.uniform(0.0, 1.0))  # sample every phase of a periodic tick
            flusher.stdin.write("flush\n")
            flusher.stdin.flush()
            flushed_at = float(flusher.stdout.readline())
            restored_at, finished = _poll_restored(client, flushed_at)
            seen.append((restored_at - flushed_at) * 1000)
            done.append((finished - flushed_at) * 1000)
    finally:
        client.close()
        flusher.kill()
        flusher.wait()
    floor = repair_floor(plan, Path(daemon.socket).parent / "state.json")
    raw["repair"] = {"observed_ms": seen, "verified_ms": done, "floor_ms": floor}
    p95 = round(pct(seen, 95), 1)
    return [
        Row(
            "repair.p50",
            f"repair after flush ({plan.flushes}x): p50",
            "ms",
            round(pct(seen, 50), 1),
            None,
        ),
        Row(
            "repair.p95",
            f"repair after flush ({plan.flushes}x): p95",
            "ms",
            p95,
            None,
            "<= 100 ms",
            p95 <= 100,
            note=f"last probe finished: p95 {pct(done, 95):.0f} ms (seen by polling every 2 ms)",
        ),
        Row(
            "repair.floor.p50",
            "repair floor: flush, register, probe: p50",
            "ms",
            round(pct(floor, 50), 1),
            None,
            note="a bare script in a private instance (see FLOOR_REPAIR), flush to last exit",
        ),
        Row("repair.floor.p95", "repair floor: p95", "ms", round(pct(floor, 95), 1), None),
    ]


def repair_floor(plan: Plan, state_file: Path) -> list[float]:
    """FLOOR_REPAIR's rounds (ms) for the daemon's own entries, in a private instance of its
    own, right after the daemon's flushes."""
    state = json.loads(state_file.read_text(encoding="utf-8"))
    work = state_file.parent / "floor"
    probes = floor_probes(work, [n.removeprefix("qemu-") for n in state["entries"]])
    jobs = work / "floor-repair.jobs"
    jobs.write_text(
        "".join(
            f"{line}\t{probes[n.removeprefix('qemu-')]}\n" for n, line in state["entries"].items()
        ),
        encoding="utf-8",
    )
    at_once = (os.cpu_count() or 1) + 1
    argv = [PYTHON, "-c", FLOOR_REPAIR, str(jobs), str(plan.flushes), str(at_once)]
    return [float(t) for t in json.loads(checked(sandboxed(argv), "repair floor"))]


def _poll_restored(client: Client, flushed_at: float) -> tuple[float, float]:
    """(time seen, time of the last probe) once every arch is verified after `flushed_at`."""
    deadline = time.time() + 30
    while time.time() < deadline:
        arches = client.get("/v1/status")["arches"]
        probes = [a["probe"] for a in arches if a["state"] == "verified" and a["probe"]]
        if len(probes) == len(arches) and all(p["at"] >= flushed_at for p in probes):
            return time.time(), max(p["at"] for p in probes)
        time.sleep(0.002)
    raise RuntimeError("the daemon did not restore its entries within 30 s")


REMOVER = (
    "import os, sys, time\n"
    "for line in sys.stdin:\n"
    f"    fd = os.open('{BINFMT_ROOT}/' + line.strip(), os.O_WRONLY)\n"
    "    at = time.time()\n"
    "    os.write(fd, b'-1')\n"
    "    os.close(fd)\n"
    "    print(repr(at), flush=True)\n"
)
STALE_ARCHES = ("aarch64", "riscv64", "s390x", "ppc64le", "arm", "mips64el")


def bench_stale(plan: Plan, daemon: Daemon, raw: dict[str, Any]) -> list[Row]:
    """Row 7a: one entry removed from outside: how long status still says `verified` (the
    stale window), and how long until it is registered and re-proven (repair)."""
    argv = ["nsenter", "--target", str(daemon.proc.pid), "--user", "--mount", PYTHON, "-c", REMOVER]
    remover = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert remover.stdin is not None and remover.stdout is not None
    client = Client(daemon.socket)
    stale, repaired = [], []
    try:
        for i in range(plan.removals):
            arch = STALE_ARCHES[i % len(STALE_ARCHES)]
            _poll_row(client, arch, 0.0, lambda row: row["state"] == "verified")
            time.sleep(random.uniform(0.0, 1.0))  # sample every phase of a periodic tick
            remover.stdin.write(f"qemu-{arch}\n")
            remover.stdin.flush()
            removed_at = float(remover.stdout.readline())
            gone = _poll_row(
                client,
                arch,
                removed_at,  # not verified, or already re-proven (then the window ended sooner)
                lambda row, t=removed_at: row["state"] != "verified" or row["probe"]["at"] >= t,
            )
            stale.append((gone - removed_at) * 1000)
            back = _poll_row(
                client,
                arch,
                removed_at,
                lambda row, t=removed_at: row["state"] == "verified" and row["probe"]["at"] >= t,
            )
            repaired.append((back - removed_at) * 1000)
    finally:
        client.close()
        remover.kill()
        remover.wait()
    raw["stale"] = {"stale_ms": stale, "repaired_ms": repaired}
    s95, r95 = round(pct(stale, 95), 1), round(pct(repaired, 95), 1)
    note = "status polled every 1 ms on a keep-alive connection"
    return [
        Row(
            "stale.p50",
            f"stale window ({plan.removals} removals): p50",
            "ms",
            round(pct(stale, 50), 1),
            None,
            note=note,
        ),
        Row(
            "stale.p95",
            f"stale window ({plan.removals} removals): p95",
            "ms",
            s95,
            None,
            "<= 20 ms",
            s95 <= 20,
            note="time status still says verified after a removal",
        ),
        Row(
            "repair1.p50",
            f"repair after one removal ({plan.removals}x): p50",
            "ms",
            round(pct(repaired, 50), 1),
            None,
        ),
        Row(
            "repair1.p95",
            f"repair after one removal ({plan.removals}x): p95",
            "ms",
            r95,
            None,
            "<= 100 ms",
            r95 <= 100,
            note="registered again and its probe passed",
        ),
    ]


def _poll_row(
    client: Client, arch: str, since: float, check: Callable[[dict[str, Any]], bool]
) -> float:
    """time.time() when `arch`'s status row first satisfies `check` (polling every 1 ms)."""
    deadline = time.time() + 30
    while time.time() < deadline:
        row = next(r for r in client.get("/v1/status")["arches"] if r["arch"] == arch)
        if check(row):
            return time.time()
        time.sleep(0.001)
    raise RuntimeError(f"{arch}: status did not change within 30 s of {since}")


# ------------------------------------------------------------------------ 8. worker follow-up


def bench_worker(plan: Plan, work: Path, raw: dict[str, Any]) -> list[Row]:
    """Row 8: `binfmtctl disable/enable aarch64` to the new set served over ListWorkers."""
    from binfmtd.buildkit import WorkerUnreachable, list_workers

    wdir = work / "worker"
    wdir.mkdir(parents=True, exist_ok=True)
    wrapper = wdir / "buildkitd"
    wrapper.write_text(f'#!/bin/sh\nexec "{PYTHON}" "{FAKE_BUILDKITD}" "$@"\n', encoding="utf-8")
    wrapper.chmod(0o755)
    kit = str(wdir / "kit.sock")
    buildkit = {
        "enabled": True,
        "path": str(wrapper),
        "socket": kit,
        "config_path": str(wdir / "buildkitd.toml"),
        "state_dir": str(wdir / "state"),
        "debounce_s": 0.2,
        "socket_group": None,
    }
    cfg = write_config(wdir / "binfmtd.yaml", wdir, buildkit=buildkit)
    daemon = start_daemon(cfg, wdir, "worker-daemon")
    try:
        if Client(daemon.socket).get("/v1/worker").get("enabled") is False:
            return [
                Row(
                    "worker.follow",
                    "worker follows a verified-set change",
                    "ms",
                    None,
                    None,
                    note="pending: buildkit.enabled is not wired into the daemon yet",
                )
            ]

        def served() -> set[str]:
            try:
                records = list_workers(kit, timeout=1.0)
            except WorkerUnreachable:
                return set()
            return set(records[0].platforms) - BUILDKIT_ADDS if records else set()

        _wait_for(lambda: "linux/arm64" in served(), 60)
        samples: dict[str, list[float]] = {"disable": [], "enable": []}
        for _ in range(plan.worker_runs):
            for action, want in (("disable", False), ("enable", True)):
                started = time.perf_counter()
                subprocess.run(
                    [BINFMTCTL, "--socket", daemon.socket, action, "aarch64"],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                _wait_for(lambda want=want: ("linux/arm64" in served()) is want, 60)
                samples[action].append((time.perf_counter() - started) * 1000)
    finally:
        daemon.stop()
    raw["worker"] = samples
    return [
        Row(
            f"worker.{action}",
            f"worker serves the new set after `binfmtctl {action} aarch64`",
            "ms",
            median(values),
            None,
            note="fake_buildkitd stand-in, debounce_s 0.2",
        )
        for action, values in samples.items()
    ]


def _wait_for(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise RuntimeError("timed out waiting for the worker")


# ------------------------------------------------------------------------ driver


def render(rows: list[Row]) -> str:
    """The results table."""
    header = ("figure", "unit", "ours", "baseline", "ratio", "target", "met")
    lines = [header]
    for r in rows:
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        lines.append(
            (r.figure, r.unit, _num(r.ours), _num(r.baseline), _num(r.ratio, "x"), r.target, met)
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def _num(value: float | None, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.3g}{suffix}" if abs(value) < 10 else f"{value:.0f}{suffix}"


SECTIONS = ("cold", "warm", "register", "idle", "ctl", "load", "stale", "repair", "worker")


def run_all(plan: Plan, only: set[str], work: Path, raw: dict[str, Any]) -> list[Row]:
    """Every selected section, in an order that reuses what earlier ones provisioned."""
    rows: list[Row] = []
    for name, func in (("cold", bench_cold), ("warm", bench_warm), ("register", bench_register)):
        if name in only:
            log(f"== {name}")
            rows += func(plan, work, raw)
    if only & {"idle", "ctl", "load", "stale", "repair"}:
        ddir = work / "daemon"
        daemon = start_daemon(write_config(ddir / "binfmtd.yaml", ddir), ddir, "daemon")
        raw["daemon_cold_ready_ms"] = daemon.ready_ms
        try:
            time.sleep(1.0)
            for name, func in (("idle", bench_idle), ("ctl", bench_ctl)):
                if name in only:
                    log(f"== {name}")
                    rows += func(plan, daemon, raw)
            if "load" in only:
                log("== load")
                rows += bench_load(plan, daemon, work, raw)
            if "stale" in only:
                log("== stale")
                rows += bench_stale(plan, daemon, raw)
            if "repair" in only:
                log("== repair")
                rows += bench_repair(plan, daemon, raw)
        finally:
            daemon.stop()
    if "worker" in only:
        log("== worker")
        rows += bench_worker(plan, work, raw)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (about 1-2 minutes)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"some of {','.join(SECTIONS)}")
    parser.add_argument("--out", default=str(REPO / "bench-results" / "bench.json"))
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (daemon logs) and say where"
    )
    parser.add_argument("--inner", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        return inner(args.inner)
    if os.geteuid() != 0:
        print("bench: run as root (user namespaces and chroot probes need it)", file=sys.stderr)
        return 1
    plan = Plan.make(args.quick)
    only = set(args.only.split(","))
    # Measured as installed: pip byte-compiles a package when it installs it. A checkout run
    # with PYTHONDONTWRITEBYTECODE=1 (set in some CI images) would compile every module in every
    # measured start instead (about 100 ms).
    import compileall

    compileall.compile_dir(str(REPO / "binfmtd"), quiet=1)
    work = Path(tempfile.mkdtemp(prefix="bfbench-", dir="/tmp"))
    work.chmod(0o755)
    raw: dict[str, Any] = {}
    started = time.monotonic()
    try:
        rows = run_all(plan, only, work, raw)
    finally:
        if args.keep:
            log(f"work directory kept: {work}")
        else:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    print(render(rows))
    if "baseline_cold" in raw:
        print(f"\ncold-provision baseline: {raw['baseline_cold']}")
    write_results(Path(args.out), plan, rows, raw, time.monotonic() - started)
    return 0


def write_results(
    path: Path, plan: Plan, rows: list[Row], raw: dict[str, Any], secs: float
) -> None:
    """bench-results/bench.json: every figure with its median, baseline, ratio and target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mode": "quick" if plan.quick else "full",
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "seconds": round(secs, 1),
        "plan": asdict(plan),
    }
    body = {"meta": meta, "rows": [asdict(r) for r in rows], "raw": raw}
    path.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {path} ({secs:.0f} s)")


def inner(argv: list[str]) -> int:
    """Sub-modes run inside a private instance (or as the floor server)."""
    mode, rest = argv[0], argv[1:]
    if mode == "warm":
        inner_warm(rest[0], int(rest[1]), rest[2])
    elif mode == "register":
        inner_register(rest[0], int(rest[1]))
    elif mode == "floor-server":
        inner_floor_server(rest[0])
    else:
        raise SystemExit(f"unknown inner mode {mode}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
