#!/usr/bin/env python3
"""Crash consistency: kill -9 binfmtd at random points of a provision, check, restart, converge.

Everything runs inside one `unshare --user --map-root-user --mount` namespace with its own
binfmt_misc instance (compose mode: binfmtd without --sandbox), so the instance survives each
kill and nothing reaches the host. Each trial:

1. starts cold (empty install dir, no state, no entries) or from a drifted converged state;
2. starts `binfmtd` (daemon) or `binfmtd --oneshot`, and SIGKILLs it after a random delay in
   [0, T] (T covers a cold provision) or right after a chosen log event (to land in the short
   register window); sometimes a second start is killed the same way;
3. checks the invariants after every kill: each registered entry whose interpreter is in the
   install dir points at a complete regular file whose checksum is the state file's record (or,
   with no record yet, the source's); the state file is valid JSON or absent;
4. restarts with `--oneshot`: exit 0, every arch verified, no `.binfmtd-tmp-*` left, state,
   files and entries agree.

Kills are classified by the last log event seen before the kill. Prints a table (or --json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

REPO = Path(__file__).resolve().parent.parent
BINFMTD = str(REPO / ".venv" / "bin" / "binfmtd")
BINFMT = "/proc/sys/fs/binfmt_misc"
TEMP_PREFIX = ".binfmtd-tmp-"
PHASES = ("start", "install", "register", "verify", "ready", "exited")
INSTALL_EVENTS = {"emulator_installed", "install_failed"}
REGISTER_EVENTS = {
    "entry_registered",
    "entry_removed",
    "entry_enabled",
    "entry_disabled",
    "action_failed",
}
VERIFY_EVENTS = {"probe_passed", "probe_failed"}
READY_EVENTS = {"reconcile_finished", "api_listening", "daemon_ready", "stale_socket_removed"}
TRIGGERS = ("emulator_installed", "entry_registered", "probe_passed")
SUBSET = ("aarch64", "arm", "ppc64le", "riscv64", "s390x", "mips64el")


@dataclass
class Kill:
    """One killed run."""

    mode: str
    how: str
    phase: str
    events: int
    temp_files: int
    violations: list[str]


@dataclass
class Totals:
    """What the whole run found."""

    trials: int = 0
    kills: list[Kill] = field(default_factory=list)
    converged: int = 0
    convergence_failures: list[str] = field(default_factory=list)
    temp_after_restart: int = 0
    leaked_probe_roots: int = 0

    @property
    def violations(self) -> list[str]:
        """Every invariant violation seen after a kill."""
        return [v for k in self.kills for v in k.violations]

    def as_json(self) -> dict[str, Any]:
        """The figures, for tests and scripts."""
        return {
            "trials": self.trials,
            "kills": len(self.kills),
            "phases": dict(Counter(k.phase for k in self.kills)),
            "modes": dict(Counter(k.mode for k in self.kills)),
            "temp_files_seen_after_kill": sum(1 for k in self.kills if k.temp_files),
            "violations": self.violations,
            "converged": self.converged,
            "convergence_failures": self.convergence_failures,
            "temp_after_restart": self.temp_after_restart,
            "leaked_probe_roots": self.leaked_probe_roots,
        }


# ---------------------------------------------------------------- the private instance


class Lab:
    """One work directory, one config, the private binfmt_misc; everything a trial touches."""

    def __init__(self, work: Path, arches: list[str], source: Path) -> None:
        self.work = work
        self.arches = arches
        self.source = source
        self.install_dir = work / "qemu"
        self.state_dir = work / "state"
        self.state_file = self.state_dir / "state.json"
        self.tmp = work / "tmp"
        self.config = work / "binfmtd.yaml"
        self.source_sha = {a: checksum(source / f"qemu-{a}-static") for a in arches}
        body = {
            "install_dir": str(self.install_dir),
            "state_file": str(self.state_file),
            "lock_file": str(work / "run" / "binfmtd.lock"),
            "arches": arches,
            "source": {"kind": "directory", "path": str(source)},
            "reconcile_interval_s": 1.0,
            "log": {"level": "info", "format": "json"},
            "api": {"socket": str(work / "run" / "api.sock"), "group": None},
        }
        self.config.write_text(json.dumps(body), encoding="utf-8")  # JSON is YAML
        self.config.chmod(0o644)
        self.tmp.mkdir(mode=0o700, exist_ok=True)

    def env(self) -> dict[str, str]:
        """binfmtd's environment: its temp dirs (probe roots) stay inside the work dir."""
        return {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LC_ALL": "C.UTF-8",
            "TMPDIR": str(self.tmp),
        }

    def entries(self) -> dict[str, dict[str, str]]:
        """name -> parsed fields of every entry in the private instance."""
        out: dict[str, dict[str, str]] = {}
        for name in os.listdir(BINFMT):
            if name in {"register", "status"}:
                continue
            with contextlib.suppress(FileNotFoundError):
                lines = Path(BINFMT, name).read_text(encoding="latin-1").splitlines()
                fields = dict(line.partition(" ")[::2] for line in lines[1:])
                fields = {k.rstrip(":"): v.strip() for k, v in fields.items()}
                fields["state"] = lines[0] if lines else ""
                out[name] = fields
        return out

    def write(self, name: str, text: str) -> None:
        """Write to a binfmt_misc file (an entry or status)."""
        with contextlib.suppress(FileNotFoundError, OSError), open(Path(BINFMT, name), "w") as f:
            f.write(text)

    def reset_cold(self) -> None:
        """No entries, no installed emulators, no state."""
        self.write("status", "-1")
        shutil.rmtree(self.install_dir, ignore_errors=True)
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def drift(self, rng: random.Random) -> str:
        """Break a converged instance the ways other tools do (never leaving a dangling entry)."""
        kind = rng.choice(["remove", "remove+delete", "disable", "flush"])
        victims = rng.sample(self.arches, k=rng.randint(1, len(self.arches)))
        if kind == "flush":
            self.write("status", "-1")
        for arch in victims:
            if kind == "disable":
                self.write(f"qemu-{arch}", "0")
            elif kind.startswith("remove"):
                self.write(f"qemu-{arch}", "-1")
                if kind == "remove+delete":
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.install_dir / f"qemu-{arch}")
        return kind

    def temp_files(self) -> list[str]:
        """Leftover temp files of an install or a state write."""
        found = []
        for directory in (self.install_dir, self.state_dir):
            with contextlib.suppress(FileNotFoundError):
                found += [n for n in os.listdir(directory) if n.startswith(TEMP_PREFIX)]
        return found

    def probe_roots(self) -> int:
        """Probe roots that a killed run left behind in its TMPDIR."""
        return len([n for n in os.listdir(self.tmp) if n.startswith("binfmtd-")])

    def clear_tmp(self) -> None:
        """Forget leaked probe roots (after counting them)."""
        for name in os.listdir(self.tmp):
            shutil.rmtree(self.tmp / name, ignore_errors=True)


def checksum(path: Path) -> str:
    """The checksum binfmtd records for a file (`blake3:<hex>`)."""
    digest = blake3.blake3()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return f"blake3:{digest.hexdigest()}"


# ---------------------------------------------------------------- invariants


def read_state(lab: Lab) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The state file's records, and any problem with the file itself."""
    try:
        raw = lab.state_file.read_bytes()
    except FileNotFoundError:
        return {}, []
    try:
        doc = json.loads(raw)
        records = doc["emulators"]
        assert isinstance(records, dict)
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        return {}, [f"state file is not valid: {exc!r} ({len(raw)} bytes)"]
    return records, []


def check_invariants(lab: Lab) -> list[str]:
    """What must hold at any instant, even right after a SIGKILL."""
    records, problems = read_state(lab)
    prefix = str(lab.install_dir) + "/"
    for name, fields in lab.entries().items():
        interpreter = fields.get("interpreter", "")
        if not interpreter.startswith(prefix):
            continue
        arch = name.removeprefix("qemu-")
        problems += check_file(lab, arch, Path(interpreter), records.get(arch))
    for arch, record in records.items():
        path = Path(record.get("path", ""))
        if path.exists() and arch in lab.source_sha and record.get("checksum") != checksum(path):
            problems.append(f"{arch}: state records {record.get('checksum')} but {path} differs")
    return problems


def linked_to_source(lab: Lab, arch: str, st: os.stat_result) -> bool:
    """Whether `st` is the source file's own inode (binfmtd installs by hard link then)."""
    try:
        source = os.stat(lab.source / f"qemu-{arch}-static")
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (source.st_dev, source.st_ino)


def check_file(lab: Lab, arch: str, path: Path, record: dict[str, Any] | None) -> list[str]:
    """A registered interpreter: a complete regular file, the recorded (or source) bytes."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return [f"{arch}: registered interpreter {path} does not exist"]
    if not stat.S_ISREG(st.st_mode) or (st.st_nlink != 1 and not linked_to_source(lab, arch, st)):
        return [
            f"{arch}: registered interpreter {path} is neither a single-link regular file nor "
            "a hard link to the source"
        ]
    digest = checksum(path)
    want = record["checksum"] if record else lab.source_sha.get(arch)
    if digest != want:
        what = "the state file's record" if record else "the source"
        return [f"{arch}: registered {path} ({st.st_size} bytes) does not match {what}"]
    return []


def check_converged(lab: Lab, doc: dict[str, Any]) -> list[str]:
    """After the restart: all verified, no temp files, state + files + entries agree."""
    problems = [f"{a['arch']}: {a['state']} ({a['error']})" for a in doc["arches"]]
    problems = [p for p, a in zip(problems, doc["arches"], strict=True) if a["state"] != "verified"]
    records, bad_state = read_state(lab)
    problems += bad_state
    entries = lab.entries()
    for arch in lab.arches:
        path = lab.install_dir / f"qemu-{arch}"
        fields = entries.get(f"qemu-{arch}", {})
        if fields.get("interpreter") != str(path) or "F" not in fields.get("flags", ""):
            problems.append(f"{arch}: entry after restart is {fields}")
        record = records.get(arch)
        if record is None or record.get("checksum") != lab.source_sha[arch]:
            problems.append(f"{arch}: state record after restart is {record}")
        problems += check_file(lab, arch, path, record)
    return problems


# ---------------------------------------------------------------- one killed run


def argv_for(lab: Lab, mode: str) -> list[str]:
    """The command for a daemon or a oneshot run, in compose mode (no --sandbox)."""
    extra = ["--oneshot", "--json"] if mode == "oneshot" else []
    return [BINFMTD, *extra, "--config", str(lab.config)]


def classify(lab: Lab, events: list[str], exited: bool) -> str:
    """The phase a kill landed in, from the last log event seen (and the instance's state)."""
    if exited:
        return "exited"
    last = events[-1] if events else None
    if last is None:
        return "install" if lab.temp_files() else "start"
    if last in INSTALL_EVENTS:
        return "install"
    if last in REGISTER_EVENTS:
        entries = lab.entries()
        done = all(entries.get(f"qemu-{a}", {}).get("state") == "enabled" for a in lab.arches)
        return "verify" if done else "register"
    if last in VERIFY_EVENTS:
        return "verify"
    if last in READY_EVENTS:
        return "ready"
    return "start"


def pick_trigger(lab: Lab, rng: random.Random) -> tuple[str, int] | None:
    """A log event to kill on (None: a random delay). Registering takes ~60 us per arch, so a
    kill on the first `entry_registered`, sent from the reader thread, lands inside it."""
    if rng.random() >= 0.35:
        return None
    event = rng.choice(TRIGGERS)
    return (event, rng.randint(1, len(lab.arches)) if event == "emulator_installed" else 1)


def run_and_kill(lab: Lab, mode: str, rng: random.Random, max_delay: float) -> Kill:
    """Start binfmtd, SIGKILL it at a random point, check the invariants at once."""
    trigger = pick_trigger(lab, rng)
    delay = rng.uniform(0, max_delay)
    events: list[str] = []
    fired, sent = threading.Event(), threading.Event()
    proc = subprocess.Popen(
        argv_for(lab, mode),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=lab.env(),
    )
    assert proc.stderr is not None
    stream = proc.stderr

    def read() -> None:
        seen: Counter[str] = Counter()
        for line in stream:
            with contextlib.suppress(ValueError):
                name = json.loads(line).get("event", "")
                events.append(name)
                seen[name] += 1
                if trigger and not fired.is_set() and (name, seen[name]) == trigger:
                    if name == "entry_registered":
                        os.kill(proc.pid, signal.SIGKILL)  # unreaped until fired is set
                        sent.set()
                    fired.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if trigger:
        fired.wait(timeout=max_delay * 3)
        time.sleep(rng.uniform(0, 0.003))
        how = f"after {trigger[0]} #{trigger[1]}"
    else:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=delay)
        how = f"after {delay:.3f} s"
    exited = proc.poll() is not None and not sent.is_set()
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join(timeout=5)
    stream.close()
    phase = classify(lab, list(events), exited)
    temps = len(lab.temp_files())
    return Kill(mode, how, phase, len(events), temps, check_invariants(lab))


def converge(lab: Lab) -> tuple[list[str], int]:
    """The restart: `binfmtd --oneshot` must exit 0 with everything verified and clean."""
    result = subprocess.run(
        argv_for(lab, "oneshot"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=lab.env(),
        timeout=120,
        check=False,
    )
    temps = lab.temp_files()
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-3:]
        return [f"restart exited {result.returncode}: {tail}"], len(temps)
    problems = check_converged(lab, json.loads(result.stdout))
    problems += [f"temp file left after restart: {t}" for t in temps]
    return problems, len(temps)


def trial(lab: Lab, rng: random.Random, max_delay: float, totals: Totals) -> None:
    """One trial: prepare, one or two kills, the restart."""
    cold = rng.random() < 0.75 or not lab.state_file.exists()
    if cold:
        lab.reset_cold()
    else:
        lab.drift(rng)
    for attempt in range(2 if rng.random() < 0.25 else 1):
        # A drifted instance or a second start has less to do: a shorter window covers it.
        window = max_delay if cold and attempt == 0 else max_delay / 2
        kill = run_and_kill(lab, rng.choice(["daemon", "oneshot"]), rng, window)
        totals.kills.append(kill)
        for violation in kill.violations:
            print(f"  VIOLATION (trial {totals.trials}, {kill.how}): {violation}", file=sys.stderr)
    totals.leaked_probe_roots += lab.probe_roots()
    lab.clear_tmp()
    problems, temps = converge(lab)
    totals.temp_after_restart += temps
    totals.trials += 1
    if problems:
        totals.convergence_failures += [f"trial {totals.trials}: {p}" for p in problems]
        print(f"  NOT CONVERGED (trial {totals.trials}): {problems}", file=sys.stderr)
    else:
        totals.converged += 1
    lab.clear_tmp()


def calibrate(lab: Lab) -> float:
    """Wall time of one cold `--oneshot` provision (process start to exit)."""
    lab.reset_cold()
    started = time.monotonic()
    problems, _ = converge(lab)
    if problems:
        raise SystemExit(f"crash-trials: the calibration provision failed: {problems}")
    return time.monotonic() - started


# ---------------------------------------------------------------- output


def table(totals: Totals, seed: int, max_delay: float, arches: int, seconds: float) -> str:
    """The human summary."""
    phases = Counter(k.phase for k in totals.kills)
    rows = [
        ("trials", totals.trials),
        ("kill -9 delivered (or process already exited)", len(totals.kills)),
        *((f"  killed during {p}", phases.get(p, 0)) for p in PHASES),
        (
            "  of them daemon / oneshot",
            f"{sum(k.mode == 'daemon' for k in totals.kills)} / "
            f"{sum(k.mode == 'oneshot' for k in totals.kills)}",
        ),
        ("kills that left a temp file behind", sum(1 for k in totals.kills if k.temp_files)),
        ("invariant violations after a kill", len(totals.violations)),
        ("restarts that converged (exit 0, all verified)", f"{totals.converged}/{totals.trials}"),
        ("temp files left after the next start", totals.temp_after_restart),
        ("probe roots leaked by killed runs (in TMPDIR)", totals.leaked_probe_roots),
    ]
    width = max(len(r[0]) for r in rows)
    head = (
        f"crash trials: seed {seed}, {arches} arches, kill delay uniform in [0, {max_delay:.2f}] s "
        f"or on a log event, {seconds:.0f} s"
    )
    return "\n".join([head, *(f"{name.ljust(width)}  {value}" for name, value in rows)])


# ---------------------------------------------------------------- entry points


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument(
        "--arches", default="all", help="'all', 'subset' (6 arches), or a comma-separated list"
    )
    parser.add_argument("--max-delay", type=float, help="T in seconds (default: calibrated)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def selected_arches(text: str, source: Path) -> list[str]:
    """The arches to provision: those with a probe and a QEMU in the source."""
    sys.path.insert(0, str(REPO))
    from binfmtd import arch as archmod
    from binfmtd.probe import probe_path

    if text == "subset":
        return list(SUBSET)
    names = [a.name for a in archmod.CATALOG] if text == "all" else text.split(",")
    native = set(archmod.native_arches(os.uname().machine, compat32=True))
    return [
        n
        for n in names
        if n not in native and probe_path(n) and (source / f"qemu-{n}-static").exists()
    ]


def inside(args: argparse.Namespace) -> int:
    """The driver, running as root of the private namespace."""
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", BINFMT], check=True)
    cache = Path(os.environ.get("BINFMTD_CACHE", REPO / "cache"))
    source = cache / "qemu" / "usr" / "bin"
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="binfmtd-crash-", dir="/tmp"))
    started = time.monotonic()
    try:
        lab = Lab(work, selected_arches(args.arches, source), source)
        max_delay = args.max_delay or calibrate(lab) * 1.1
        totals = Totals()
        for _ in range(args.trials):
            trial(lab, rng, max_delay, totals)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - started
    if args.json:
        doc = totals.as_json() | {"seed": seed, "max_delay_s": max_delay, "seconds": elapsed}
        print(json.dumps(doc | {"arches": lab.arches}, indent=2))
    else:
        print(table(totals, seed, max_delay, len(lab.arches), elapsed))
    bad = totals.violations or totals.convergence_failures
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    """Re-run this script inside a fresh user + mount namespace, then drive the trials."""
    args = parse_args(argv)
    if args.inside:
        return inside(args)
    command = ["unshare", "--user", "--map-root-user", "--mount", sys.executable, __file__]
    return subprocess.call([*command, "--inside", *argv], stdin=subprocess.DEVNULL)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
