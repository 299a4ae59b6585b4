"""Repair order (issue 14): status is corrected before anything slow, probes start as soon as
each entry is registered, and a probe counts only for the very entry it ran through. Real
kernel (a private binfmt_misc instance), real QEMU, real probes; the engine driven in-process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import daemonutil as du
from conftest import write_config
from daemonutil import SandboxSh

ARCHES = ["aarch64", "s390x", "riscv64"]

# Runs inside the sandbox: $CFG is the config, $HOOK picks what the script checks.
SCRIPT = r"""
import json, os, sys, threading
sys.path.insert(0, os.environ["REPO"])
import structlog
from binfmtd import config, probe
from binfmtd.engine import Engine

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
eng = Engine(config.load(os.environ["CFG"]), structlog.get_logger())
eng.detect_native()
out = {}
started = threading.Event()
real_submit = probe.Stage.submit

def submit(self, *args, **kwargs):  # a probe is handed to the runner: it runs from now on
    started.set()
    return real_submit(self, *args, **kwargs)

probe.Stage.submit = submit
kernel = eng.kernel
real_register, real_ident = kernel.register, kernel.ident
last = eng.registration(eng.selected[-1]).name
hook = os.environ["HOOK"]

def register(reg):
    if hook == "pipeline" and reg.name == last:
        # A probe of an earlier arch must already run: wait for it (it never comes if probes
        # only start after the whole batch).
        out["probe_before_last_register"] = started.wait(60)
    real_register(reg)

def ident(name):
    found = real_ident(name)
    if hook == "replaced" and name == last:  # another tool swaps the entry right after ours
        text = open(kernel.root / name).read()
        kernel.remove(name)
        real_register(eng.registration(eng.selected[-1]))
    return found

kernel.register, kernel.ident = register, ident
report = eng.tick()
out["verified"] = sorted(report.verified)
out["states"] = {s.arch: s.state.value for s in eng.statuses()}
if hook == "removed":
    seen = []
    def progress():
        name = eng.registration("s390x").name
        seen.append((eng.status_of("s390x").state.value, os.path.exists(kernel.root / name)))
    kernel.remove(eng.registration("s390x").name)
    eng.tick(progress=progress)
    out["first_progress"] = seen[0]
    out["final"] = eng.status_of("s390x").state.value
if hook == "replaced":
    hook = ""
    again = eng.tick()
    out["second_verified"] = sorted(again.verified)
    out["second_states"] = {s.arch: s.state.value for s in eng.statuses()}
print(json.dumps(out))
"""


def drive(sandbox_sh: SandboxSh, tmp: Path, hook: str) -> dict[str, Any]:
    """Run SCRIPT in a fresh private instance with `hook`; its JSON answer."""
    cfg = write_config(tmp, arches=ARCHES)
    return du.sandbox_json(sandbox_sh, SCRIPT, {"CFG": str(cfg), "HOOK": hook})


def test_probes_start_before_the_last_registration_of_a_batch(
    sandbox_sh: SandboxSh, tmp_path: Path
) -> None:
    """A cold pass starts each probe right after its registration, not after the batch."""
    out = drive(sandbox_sh, tmp_path, "pipeline")
    assert out["probe_before_last_register"] is True
    assert out["verified"] == sorted(ARCHES)
    assert set(out["states"].values()) == {"verified"}


def test_a_probe_does_not_count_for_an_entry_that_replaced_its_own(
    sandbox_sh: SandboxSh, tmp_path: Path
) -> None:
    """An entry swapped right after binfmtd registered it is not shown verified by the probe
    of the entry it replaced; the next pass proves the new one."""
    out = drive(sandbox_sh, tmp_path, "replaced")
    last = ARCHES[-1]
    assert last not in out["verified"]
    assert out["states"][last] != "verified"
    assert out["second_verified"] == [last]
    assert set(out["second_states"].values()) == {"verified"}


def test_a_removed_entry_is_shown_unverified_before_it_is_repaired(
    sandbox_sh: SandboxSh, tmp_path: Path
) -> None:
    """The first status published after a removal already says not verified, while the entry
    is still missing (before any repair), and the pass ends verified again."""
    out = drive(sandbox_sh, tmp_path, "removed")
    state, entry_exists = out["first_progress"]
    assert state != "verified"
    assert entry_exists is False
    assert out["final"] == "verified"
