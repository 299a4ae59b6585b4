#!/usr/bin/env python3
"""Soak: one `binfmtd --sandbox` daemon under 64 status readers and a drift injector.

The readers request GET /v1/status over keep-alive connections as fast as they can and check
every answer. The injector breaks a random arch (or all of them) every 0.5-3 s from inside the
daemon's namespace (nsenter): remove, disable, flush, re-register with other flags, delete the
interpreter.

A *wrong answer* is a well-formed status that claims an arch is `verified` while
- its own row contradicts it (not registered, not enabled, no F flag, interpreter outside the
  install dir), or
- a drift that broke that arch happened more than GRACE before the request was sent and the
  row's probe.at is older than that drift (status still shows the proof from before the
  breakage). Reconcile is event-driven (inotify), so GRACE is 100 ms by default: the stale
  window's target is 20 ms, the rest is margin for a machine this soak loads fully.
Inside GRACE the daemon has not necessarily observed the drift yet, so nothing is claimed then.
Anything else that fails (connect, status code, bad JSON) counts as an error.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from binfmtd import arch as archmod  # noqa: E402
from binfmtd.binfmt import Registration  # noqa: E402

BINFMTD = str(REPO / ".venv" / "bin" / "binfmtd")
ENTRIES = "/proc/sys/fs/binfmt_misc"
ARCHES = ("aarch64", "arm", "ppc64le", "riscv64", "s390x", "mips64el", "sparc64", "m68k")
DRIFTS = ("remove", "disable", "flush", "flags", "delete")
CLIENTS = 64


@dataclass
class Drifts:
    """Successful drifts per arch: (monotonic, wall) times, in order."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    mono: dict[str, list[float]] = field(default_factory=dict)
    wall: dict[str, list[float]] = field(default_factory=dict)
    kind: dict[str, list[str]] = field(default_factory=dict)
    kinds: Counter[str] = field(default_factory=Counter)

    def add(self, arches: list[str], kind: str, mono: float, wall: float) -> None:
        """Record a drift that took effect."""
        with self.lock:
            for arch in arches:
                self.mono.setdefault(arch, []).append(mono)
                self.wall.setdefault(arch, []).append(wall)
                self.kind.setdefault(arch, []).append(kind)
            self.kinds[kind] += 1

    def last_due(self, arch: str, before: float) -> tuple[float, str] | None:
        """(wall time, kind) of the latest drift of `arch` that happened before monotonic
        `before`."""
        with self.lock:
            times = self.mono.get(arch, [])
            index = bisect.bisect_left(times, before)
            return (self.wall[arch][index - 1], self.kind[arch][index - 1]) if index else None


@dataclass
class Tally:
    """What the readers saw."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    served: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    verified_rows: int = 0

    def record(self, latency: float, wrong: list[str], verified: int) -> None:
        """One answer checked."""
        with self.lock:
            self.served += 1
            self.verified_rows += verified
            if len(self.latencies) < 200_000:
                self.latencies.append(latency)
            self.wrong += wrong[: max(0, 50 - len(self.wrong))]
            if wrong:
                self.errors["wrong answers"] += len(wrong)

    def error(self, kind: str) -> None:
        """One failed request."""
        with self.lock:
            self.errors[kind] += 1


# ---------------------------------------------------------------- the daemon


class Daemon:
    """The daemon under test, in its own user + mount namespace with a private binfmt_misc."""

    def __init__(self, work: Path, arches: list[str], interval: float | None) -> None:
        self.work = work
        self.arches = arches
        self.install_dir = str(work / "qemu")
        self.socket = str(work / "run" / "api.sock")
        self.log = work / "daemon.log"
        cache = Path(os.environ.get("BINFMTD_CACHE", REPO / "cache"))
        body = {
            "install_dir": self.install_dir,
            "state_file": str(work / "state" / "state.json"),
            "lock_file": str(work / "run" / "binfmtd.lock"),
            "arches": arches,
            "source": {"kind": "directory", "path": str(cache / "qemu" / "usr" / "bin")},
            "log": {"level": "info", "format": "json"},
            "api": {"socket": self.socket, "group": None},
        }
        if interval is not None:
            body["reconcile_interval_s"] = interval
        self.config = work / "binfmtd.yaml"
        self.config.write_text(json.dumps(body), encoding="utf-8")
        self.config.chmod(0o644)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> None:
        """Start it and wait until the API says ready."""
        outer = ["unshare", "--user", "--map-root-user", "--mount"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*outer, BINFMTD, "--sandbox", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"soak: binfmtd exited {self.proc.returncode}; see {self.log}")
            with contextlib.suppress(OSError, ValueError):
                if get_json(self.socket, "/v1/health").get("ready"):
                    return
            time.sleep(0.1)
        raise SystemExit(f"soak: binfmtd not ready after {timeout} s; see {self.log}")

    @property
    def pid(self) -> int:
        """The daemon's pid (the outer unshare execs it)."""
        assert self.proc is not None
        return self.proc.pid

    def rss_mib(self) -> float:
        """Resident memory of the daemon, MiB."""
        return psutil.Process(self.pid).memory_info().rss / (1 << 20)

    def alive(self) -> bool:
        """Whether the daemon still runs."""
        return self.proc is not None and self.proc.poll() is None

    def nsenter(self, script: str) -> str | None:
        """Run `bash -c script` in the daemon's namespaces; its output when it succeeded."""
        argv = ["nsenter", "--target", str(self.pid), "--user", "--mount", "--", "bash", "-c"]
        result = subprocess.run(
            [*argv, script], capture_output=True, timeout=30, stdin=subprocess.DEVNULL, check=False
        )
        return result.stdout.decode().strip() if result.returncode == 0 else None

    def events(self) -> list[dict[str, Any]]:
        """The daemon's JSON log events."""
        out = []
        for line in self.log.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def stop(self) -> int | None:
        """SIGTERM and wait; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def get_json(path: str, target: str) -> dict[str, Any]:
    """One GET on a fresh connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return dict(json.loads(data.partition(b"\r\n\r\n")[2]))


# ---------------------------------------------------------------- readers and the checker


class Reader:
    """One keep-alive connection that reads /v1/status until told to stop."""

    REQUEST = b"GET /v1/status HTTP/1.1\r\nHost: soak\r\n\r\n"

    def __init__(self, daemon: Daemon, drifts: Drifts, tally: Tally, grace: float) -> None:
        self.daemon, self.drifts, self.tally, self.grace = daemon, drifts, tally, grace
        self.sock: socket.socket | None = None
        self.buf = b""

    def run(self, stop: threading.Event) -> None:
        """Request, read, check; reconnect after any error."""
        while not stop.is_set():
            try:
                sent = time.monotonic()
                status, body = self.request()
                latency = time.monotonic() - sent
            except (OSError, ValueError) as exc:
                self.tally.error(f"request failed: {type(exc).__name__}")
                self.close()
                time.sleep(0.05)
                continue
            if status != 200:
                self.tally.error(f"HTTP {status}")
                continue
            try:
                doc = json.loads(body)
            except ValueError:
                self.tally.error("malformed JSON")
                continue
            wrong, verified = self.check(doc, sent)
            self.tally.record(latency, wrong, verified)
        self.close()

    def request(self) -> tuple[int, bytes]:
        """One request on the kept-alive connection."""
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(10)
            self.sock.connect(self.daemon.socket)
            self.buf = b""
        self.sock.sendall(self.REQUEST)
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.recv()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        length = int(headers["content-length"])
        while len(self.buf) < length:
            self.buf += self.recv()
        body, self.buf = self.buf[:length], self.buf[length:]
        if headers.get("connection", "").lower() == "close":
            self.close()
        return int(lines[0].split()[1]), body

    def recv(self) -> bytes:
        assert self.sock is not None
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("closed by the daemon")
        return chunk

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def check(self, doc: dict[str, Any], sent: float) -> tuple[list[str], int]:
        """Wrong claims in one status answer, and how many verified rows it had."""
        wrong: list[str] = []
        verified = 0
        prefix = self.daemon.install_dir + "/"
        for row in doc["arches"]:
            if row["state"] != "verified":
                continue
            verified += 1
            arch = row["arch"]
            if not (row["registered"] and row["enabled"] and "F" in row["flags"]):
                wrong.append(f"{arch}: verified but registered/enabled/flags = {row}")
            elif not str(row["interpreter"]).startswith(prefix):
                wrong.append(f"{arch}: verified with interpreter {row['interpreter']}")
            due = self.drifts.last_due(arch, sent - self.grace)
            probed = (row.get("probe") or {}).get("at") or 0.0
            if due is not None and probed < due[0]:
                wrong.append(
                    f"{arch}: verified from a probe at {probed:.3f}, before a drift ({due[1]}) "
                    f"at {due[0]:.3f} that is more than {self.grace:g} s old"
                )
        return wrong, verified


# ---------------------------------------------------------------- the drift injector


def drift_script(daemon: Daemon, kind: str, arch: str) -> str:
    """Bash that breaks `arch` (or everything, for flush) in the daemon's binfmt_misc and prints
    the wall-clock time just before its first write ($EPOCHREALTIME: a builtin, no fork)."""
    entry = f"{ENTRIES}/qemu-{arch}"
    now = "T=$EPOCHREALTIME && "
    if kind == "remove":
        act = f"{now}echo -1 > {entry}"
    elif kind == "disable":
        act = f"grep -qx enabled {entry} && {now}echo 0 > {entry}"
    elif kind == "flush":
        act = f"{now}echo -1 > {ENTRIES}/status"
    elif kind == "flags":
        row = archmod.BY_NAME[arch]
        path = os.path.join(daemon.install_dir, f"qemu-{arch}")
        line = Registration(row.entry_name, row.magic, row.mask, path, "PF").register_string()
        act = f"{now}echo -1 > {entry} && printf '%s' '{line}' > {ENTRIES}/register"
    else:
        act = f"{now}rm {daemon.install_dir}/qemu-{arch}"
    return act + ' && echo "$T"'


def inject(daemon: Daemon, drifts: Drifts, stop: threading.Event, rng: random.Random) -> None:
    """Random drift every 0.5-3 s; only drifts that took effect are recorded, at the time the
    drift's own shell took just before writing (starting nsenter and a shell can take tens of
    ms when the readers keep both CPUs busy: the time before that would count the start-up
    against the daemon)."""
    while not stop.wait(rng.uniform(0.5, 3.0)):
        kind = rng.choice(DRIFTS)
        arch = rng.choice(daemon.arches)
        wall, mono = time.time(), time.monotonic()
        done = daemon.nsenter(drift_script(daemon, kind, arch))
        if done is not None:
            at = float(done)  # the same wall clock; monotonic is taken from the offset
            drifts.add(daemon.arches if kind == "flush" else [arch], kind, mono + at - wall, at)


# ---------------------------------------------------------------- the run


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values`, in ms."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


SETTLE_S = 10.0  # after the last drift: its repair (a flush of every arch: ~0.1-0.2 s) ends


def settled(daemon: Daemon, alive: bool) -> tuple[dict[str, Any], float]:
    """The status once every arch is verified again after the last drift (or after SETTLE_S,
    as it is then), and how long that took in seconds."""
    began = time.monotonic()
    final: dict[str, Any] = {"arches": []}
    while alive:
        final = get_json(daemon.socket, "/v1/status")
        waited = time.monotonic() - began
        if all(r["state"] == "verified" for r in final["arches"]) or waited > SETTLE_S:
            return final, waited
        time.sleep(0.01)
    return final, 0.0


def soak(minutes: float, arches: list[str], interval: float | None, seed: int, grace: float) -> int:
    """Run the soak; print the summary; 0 when nothing was wrong."""
    work = Path(tempfile.mkdtemp(prefix="binfmtd-soak-", dir="/tmp"))
    daemon = Daemon(work, arches, interval)
    drifts, tally, stop = Drifts(), Tally(), threading.Event()
    try:
        daemon.start()
        rss_start = daemon.rss_mib()
        readers = [Reader(daemon, drifts, tally, grace) for _ in range(CLIENTS)]
        threads = [threading.Thread(target=r.run, args=(stop,), daemon=True) for r in readers]
        threads.append(
            threading.Thread(
                target=inject, args=(daemon, drifts, stop, random.Random(seed)), daemon=True
            )
        )
        started = time.monotonic()
        for thread in threads:
            thread.start()
        rss_max = rss_start
        while time.monotonic() - started < minutes * 60 and daemon.alive():
            time.sleep(1)
            with contextlib.suppress(psutil.Error):
                rss_max = max(rss_max, daemon.rss_mib())
        alive = daemon.alive()
        rss_end = daemon.rss_mib() if alive else float("nan")
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
        elapsed = time.monotonic() - started
        final, settle_s = settled(daemon, alive)
        code = daemon.stop()
        events = daemon.events()
    finally:
        if daemon.alive():
            daemon.stop()
        keep = os.environ.get("SOAK_KEEP")
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    finished = [e for e in events if e.get("event") == "reconcile_finished"]
    repairs = sum(len(e.get("repaired", [])) for e in finished)
    states = Counter(row["state"] for row in final["arches"])
    rows = [
        ("duration", f"{elapsed:.0f} s ({minutes:g} min asked), seed {seed}"),
        (
            "arches / safety pass / grace",
            f"{len(arches)} / {'default' if interval is None else f'{interval:g} s'} / "
            f"{grace * 1000:g} ms",
        ),
        ("clients", f"{CLIENTS} threads, keep-alive GET /v1/status"),
        ("requests served", f"{tally.served} ({tally.served / elapsed:.0f}/s)"),
        (
            "latency p50 / p99",
            f"{percentile(tally.latencies, 0.5):.1f} / {percentile(tally.latencies, 0.99):.1f} ms",
        ),
        ("verified rows checked", tally.verified_rows),
        ("drifts injected", f"{sum(drifts.kinds.values())} {dict(drifts.kinds)}"),
        ("repairs (reconcile_finished events)", f"{len(finished)} ({repairs} actions)"),
        ("wrong answers", tally.errors.get("wrong answers", 0)),
        ("errors", sum(tally.errors.values()) - tally.errors.get("wrong answers", 0)),
        ("daemon alive at the end / exit on SIGTERM", f"{alive} / {code}"),
        ("final states (settled after)", f"{dict(states)} ({settle_s * 1000:.0f} ms)"),
        ("RSS start / max / end", f"{rss_start:.1f} / {rss_max:.1f} / {rss_end:.1f} MiB"),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name.ljust(width)}  {value}" for name, value in rows))
    for row in final["arches"]:
        if row["state"] != "verified":
            print(f"  NOT VERIFIED: {row['arch']} {row['state']}: {row.get('error')}")
    for line in tally.wrong[:10]:
        print(f"  WRONG: {line}")
    for kind, count in tally.errors.items():
        if kind != "wrong answers":
            print(f"  error: {kind} x{count}")
    ok = alive and code == 0 and not tally.wrong and states.get("verified") == len(arches)
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="one minute")
    parser.add_argument("--arches", default=",".join(ARCHES), help="comma-separated, or 'all'")
    parser.add_argument(
        "--interval", type=float, default=None, help="reconcile_interval_s (default: the daemon's)"
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--grace", type=float, default=0.1, help="seconds (default 0.1); 0 shows the checker bites"
    )
    args = parser.parse_args(argv)
    if args.arches == "all":
        native = set(archmod.native_arches(os.uname().machine, compat32=True))
        arches = [a.name for a in archmod.CATALOG if a.name not in native]
    else:
        arches = args.arches.split(",")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    return soak(1.0 if args.quick else args.minutes, arches, args.interval, seed, args.grace)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
