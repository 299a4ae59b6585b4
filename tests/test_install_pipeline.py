"""The install pipeline (issue 14): an arch is registered and probed as soon as its emulator is
installed, checksummed and recorded, while other arches are still being installed. Real kernel
(a private binfmt_misc instance), real QEMU, real probes; the engine driven in-process where an
ordering has to be witnessed, the real `binfmtd --oneshot` otherwise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import daemonutil as du
from conftest import Cache, write_config
from daemonutil import SandboxSh

from binfmtd import run as runmod

# More arches than installs.BATCH, so that a batch forms while the last install is held.
ARCHES = ["aarch64", "arm", "mips64el", "ppc64le", "riscv64", "s390x"]

# Runs inside the sandbox: $CFG is the config, $HOOK what to do once a probe starts.
SCRIPT = r"""
import json, os, signal, sys, threading
sys.path.insert(0, os.environ["REPO"])
import structlog
from binfmtd import config, emulators, probe
from binfmtd.engine import Engine

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
eng = Engine(config.load(os.environ["CFG"]), structlog.get_logger())
eng.detect_native()
hook, held, out = os.environ["HOOK"], eng.selected[-1], {}
probing = threading.Event()
real_submit, real_install = probe.Stage.submit, emulators.install_stream

def submit(self, *args, **kwargs):  # a probe is handed to the runner: it runs from now on
    if hook == "kill":  # a probe starts while the last install is held: die as a SIGKILL does
        os.kill(os.getpid(), signal.SIGKILL)
    probing.set()
    return real_submit(self, *args, **kwargs)

def install_stream(stream, arch, *args, **kwargs):
    if arch == held:  # it finishes only once a probe of another arch has started
        out["probe_before_last_install"] = probing.wait(60)
    return real_install(stream, arch, *args, **kwargs)

probe.Stage.submit, emulators.install_stream = submit, install_stream
report = eng.tick()
out["verified"] = sorted(report.verified)
out["states"] = {s.arch: s.state.value for s in eng.statuses()}
print(json.dumps(out))
"""

# After the kill: every entry in the instance is on record, and runs the recorded file.
CHECK = r"""
import json, os, sys
sys.path.insert(0, os.environ["REPO"])
from binfmtd import emulators
root = "/proc/sys/fs/binfmt_misc"
inode = lambda path: os.stat(path).st_ino  # a linked install shares the source's inode
state = json.load(open(os.environ["STATE"]))
records = {r["path"]: r for r in state["emulators"].values()}
found, problems = [], []
for name in sorted(set(os.listdir(root)) - {"register", "status"}):
    text = open(os.path.join(root, name)).read()
    interpreter = next(l.split()[1] for l in text.splitlines() if l.startswith("interpreter"))
    found.append(name)
    record = records.get(interpreter)
    if name not in state.get("entries", {}):
        problems.append(f"{name} not in the ownership record")
    elif record is None:
        problems.append(f"{name}: {interpreter} has no install record")
    elif not emulators.matches(interpreter, record["checksum"], linked_inode=inode(interpreter)):
        problems.append(f"{name}: {interpreter} does not match its recorded checksum")
print(json.dumps({"entries": found, "problems": problems}))
"""


def drive(sandbox_sh: SandboxSh, tmp: Path, hook: str) -> dict[str, Any]:
    """Run SCRIPT in a fresh private instance with `hook`; its JSON answer."""
    cfg = write_config(tmp, arches=ARCHES)
    return du.sandbox_json(sandbox_sh, SCRIPT, {"CFG": str(cfg), "HOOK": hook})


def test_a_probe_starts_before_the_last_install_finishes(
    sandbox_sh: SandboxSh, tmp_path: Path
) -> None:
    """The last arch's install waits until a probe of another arch has started (it never would
    if probes only started after every install), and then every arch is verified."""
    out = drive(sandbox_sh, tmp_path, "witness")
    assert out["probe_before_last_install"] is True
    assert out["verified"] == ARCHES
    assert set(out["states"].values()) == {"verified"}


def test_a_kill_mid_pipeline_leaves_no_unrecorded_entry(
    sandbox_sh: SandboxSh, tmp_path: Path
) -> None:
    """SIGKILL while the first probe starts and the last install is still held: every entry in
    the instance is on record with the checksum of the file it runs, the held arch has no entry,
    and a restart (`binfmtd --oneshot`) verifies every arch."""
    cfg = write_config(tmp_path, arches=ARCHES)
    script = (
        '"$PYTHON" -c "$SCRIPT" || true\n'
        '"$PYTHON" -c "$CHECK"\n'
        '"$BINFMTD" --oneshot --json --config "$CFG"\n'
    )
    env = {
        "CFG": str(cfg),
        "HOOK": "kill",
        "SCRIPT": SCRIPT,
        "CHECK": CHECK,
        "STATE": str(tmp_path / "state" / "state.json"),
    }
    done = sandbox_sh(script, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    after_kill = json.loads(lines[0])
    assert after_kill["problems"] == []
    assert after_kill["entries"], "the kill came before any registration"
    assert "qemu-s390x" not in after_kill["entries"]
    restart = json.loads("\n".join(lines[1:]))
    assert {a["arch"]: a["state"] for a in restart["arches"]} == dict.fromkeys(ARCHES, "verified")


def test_a_failed_install_still_lets_the_others_verify(
    sandbox_sh: SandboxSh, tmp_path: Path, cache: Cache
) -> None:
    """The first arch's emulator is unusable (an arm64 program): that arch fails with the reason,
    gets no entry and no record; every other arch is installed, registered and verified."""
    source = tmp_path / "src"
    source.mkdir()
    for arch in ARCHES[1:]:
        shutil.copyfile(cache.qemu_dir / f"qemu-{arch}-static", source / f"qemu-{arch}-static")
    shutil.copyfile(cache.busybox("arm64"), source / "qemu-aarch64-static")
    for path in source.iterdir():
        path.chmod(0o755)
    cfg = write_config(tmp_path, arches=ARCHES, source={"kind": "directory", "path": str(source)})
    done = sandbox_sh(
        '"$BINFMTD" --oneshot --json --config "$CFG" || echo "exit $?" >&2\n'
        "echo ---; ls /proc/sys/fs/binfmt_misc",
        env={"CFG": str(cfg)},
    )
    text, _, listing = done.stdout.partition("---\n")
    report = json.loads(text)
    rows = {a["arch"]: a for a in report["arches"]}
    assert rows["aarch64"]["state"] != "verified"
    assert "unusable" in rows["aarch64"]["error"]
    assert {a: rows[a]["state"] for a in ARCHES[1:]} == dict.fromkeys(ARCHES[1:], "verified")
    assert "exit 1" in done.stderr
    assert "qemu-aarch64" not in listing.split()
    assert "qemu-s390x" in listing.split()
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert sorted(state["emulators"]) == ARCHES[1:]
    assert "qemu-aarch64" not in state["entries"]


def test_no_process_starts_while_an_emulator_is_open_for_writing() -> None:
    """A spawn waits while an install holds a file open for writing (a child would carry the
    descriptor and make the kernel refuse to register that emulator: ETXTBSY), and a writer
    that comes while a spawn waits lets the spawn go first."""
    gate = runmod.ForkGate()
    order: list[str] = []

    def spawn() -> None:
        with gate.spawning():
            order.append("spawn")

    def second_writer() -> None:
        with gate.writing():
            order.append("writer 2")

    with gate.writing():
        spawner = threading.Thread(target=spawn)
        spawner.start()
        wait_until(lambda: gate._waiting[gate._SPAWN] == 1)
        writer = threading.Thread(target=second_writer)
        writer.start()
        wait_until(lambda: gate._waiting[gate._WRITE] == 1)
        order.append("writer 1 done")
    spawner.join()
    writer.join()
    assert order == ["writer 1 done", "spawn", "writer 2"]


def wait_until(condition: Callable[[], bool]) -> None:
    """Block until `condition()` holds (another thread got there); no deadline: pytest's is."""
    event = threading.Event()
    while not condition():
        event.wait(0.001)


def test_run_starts_children_inside_the_gate(monkeypatch: Any) -> None:
    """`run.run` holds `FORKS.spawning()` while its child starts, and still returns its output."""
    seen: list[int] = []
    real = subprocess.Popen

    def popen(*args: Any, **kwargs: Any) -> Any:
        seen.append(runmod.FORKS._inside[runmod.FORKS._SPAWN])
        return real(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    result = runmod.run(["/bin/echo", "hi"], timeout=10)
    assert result.stdout == b"hi\n"
    assert seen == [1]
