"""End to end on the real kernel: binfmtd provisions real QEMU, real foreign binaries run.

Every run happens in a private binfmt_misc: `binfmtd --sandbox` makes its own, or `sandbox_sh`
provides an already-mounted one that binfmtd (without --sandbox) must compose with.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import pytest
from conftest import Cache, write_config
from daemonutil import BINFMTD, SandboxSh

from binfmtd import arch as archmod
from binfmtd.binfmt import Registration, parse_entry
from binfmtd.preflight import Exit, PreflightError, check_kernel

ENTRIES = "/proc/sys/fs/binfmt_misc"
DUMP = f"""for f in {ENTRIES}/*; do
  n=${{f##*/}}; [ "$n" = register ] || [ "$n" = status ] && continue
  printf '=== %s\\n' "$n"; cat "$f"
done"""


@dataclass(frozen=True)
class Run:
    """One binfmtd run inside a sandbox, and the instance's entries right after it."""

    code: int
    stdout: str
    stderr: str
    entries: dict[str, str]
    state: str


def parse_dump(text: str) -> dict[str, str]:
    """name -> entry text, from DUMP's output."""
    out: dict[str, str] = {}
    for chunk in text.split("=== ")[1:]:
        name, _, body = chunk.partition("\n")
        out[name] = body
    return out


def provision(
    sandbox_sh: SandboxSh,
    work: Path,
    cfg: Path,
    *,
    before: str = "",
    runs: int = 1,
    args: str = "",
) -> tuple[dict[str, str], list[Run]]:
    """Run `binfmtd --oneshot` (no --sandbox) `runs` times in one sandbox_sh instance.

    Returns the entries present before the first run (after `before`) and each run's outcome.
    """
    out = work / "out"
    out.mkdir(exist_ok=True)
    state = work / "state" / "state.json"
    script = f"""{before}
{DUMP} > "$OUT/entries.0"
for i in $(seq 1 {runs}); do
  rc=0; "$BINFMTD" --oneshot {args} --config "$CFG" >"$OUT/out.$i" 2>"$OUT/err.$i" || rc=$?
  echo "$rc" >"$OUT/rc.$i"
  {DUMP} > "$OUT/entries.$i"
  cat "$STATE" >"$OUT/state.$i" 2>/dev/null || true
done"""
    result = sandbox_sh(script, env={"OUT": str(out), "CFG": str(cfg), "STATE": str(state)})
    assert result.returncode == 0, f"sandbox script failed: {result.stderr}"

    def read(name: str) -> str:
        return (out / name).read_text(encoding="utf-8")

    runs_done = [
        Run(
            int(read(f"rc.{i}")),
            read(f"out.{i}"),
            read(f"err.{i}"),
            parse_dump(read(f"entries.{i}")),
            read(f"state.{i}"),
        )
        for i in range(1, runs + 1)
    ]
    return parse_dump(read("entries.0")), runs_done


def sandboxed(
    cfg: Path, *extra: str, command: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`binfmtd --oneshot --sandbox --config cfg [extra] [-- bash -c command]`.

    Belt and braces: it starts inside an outer user + mount namespace, so even a broken
    --sandbox could only ever reach that namespace's own binfmt_misc, never the host's.
    """
    outer = ["unshare", "--user", "--map-root-user", "--mount"]
    argv = [*outer, BINFMTD, "--oneshot", "--sandbox", "--config", str(cfg), *extra]
    if command is not None:
        argv += ["--", "bash", "-c", command]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
    )


def table_rows(stdout: str) -> dict[str, list[str]]:
    """arch -> cells of the oneshot table."""
    lines = stdout.split("\n\n", maxsplit=1)[0].splitlines()
    assert lines[0].split()[:3] == ["ARCH", "PLATFORMS", "STATE"], stdout
    return {line.split()[0]: line.split() for line in lines[1:]}


def events(stderr: str) -> list[dict[str, Any]]:
    """The JSON log events binfmtd wrote to stderr."""
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def installed_names(cfg_dir: Path) -> list[str]:
    """What is in the install directory (none when it was never created)."""
    path = cfg_dir / "qemu"
    return sorted(os.listdir(path)) if path.exists() else []


# ---------------------------------------------------------------- the happy paths


def test_all_arches_registered_with_f_and_verified(tmp_path: Path) -> None:
    """Every non-native arch: entry with F inside the sandbox, table says verified, exit 0."""
    cfg = write_config(tmp_path)
    try:
        result = sandboxed(cfg, command=f"grep -H '^flags:' {ENTRIES}/qemu-*")
    finally:
        shutil.rmtree(tmp_path / "qemu", ignore_errors=True)  # 33 emulators: ~360 MB
    assert result.returncode == 0, result.stderr
    expected = {a.name for a in archmod.CATALOG} - {"x86_64", "i386"}
    assert len(expected) == 33
    rows = table_rows(result.stdout)
    assert set(rows) == expected
    for _arch, cells in rows.items():
        assert cells[2] == "verified" and cells[3] == "POF", cells
        assert cells[6] == "ago" and cells[8] == "ms)", cells  # VERIFIED: 0s ago (12.3 ms)
    flags = dict(
        line.split(":", 1) for line in result.stdout.splitlines() if line.startswith(ENTRIES)
    )
    assert {Path(p).name for p in flags} == {f"qemu-{a}" for a in expected}
    assert all("F" in value.split(":", 1)[1] for value in flags.values()), flags
    assert "native: x86_64, i386" in result.stdout


BUSYBOX = [
    ("arm64", "aarch64", "aarch64"),
    ("armhf", "arm", "armv7l"),
    ("ppc64el", "ppc64le", "ppc64le"),
    ("s390x", "s390x", "s390x"),
    ("mips64el", "mips64el", "mips64"),
]


@pytest.mark.parametrize(("debarch", "arch", "machine"), BUSYBOX)
def test_real_busybox_runs_directly_and_from_an_empty_chroot(
    tmp_path: Path, busybox: Callable[[str], Path], debarch: str, arch: str, machine: str
) -> None:
    """Debian's static busybox prints its `uname -m`, also chrooted where no QEMU exists (F)."""
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(busybox(debarch), root / "bin" / "busybox")
    cfg = write_config(tmp_path, arches=[arch])
    command = (
        f"echo direct=$({busybox(debarch)} uname -m); "
        f"echo chroot=$(chroot {root} /bin/busybox uname -m); "
        f"echo files=$(chroot {root} /bin/busybox find / | sort | tr '\\n' ' ')"
    )
    result = sandboxed(cfg, command=command)
    assert result.returncode == 0, result.stderr
    said = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert (said["direct"], said["chroot"]) == (machine, machine)
    assert said["files"].split() == ["/", "/bin", "/bin/busybox"]


def test_json_output_shape_and_state_file(tmp_path: Path) -> None:
    """--json prints the documented shape; checksums there and in the state file match the files."""
    cfg = write_config(tmp_path, arches=["riscv64", "s390x"])
    result = sandboxed(cfg, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert set(doc) == {
        *("sandbox", "durations_ms", "actions", "native", "native_proof", "platforms"),
        *("arches", "wire"),
    }
    assert doc["native_proof"] == {
        "x86_64": "this host's own format",
        "i386": "the probe ran natively",
    }
    assert doc["actions"] == [
        "install riscv64",
        "register qemu-riscv64",
        "install s390x",
        "register qemu-s390x",
    ]
    assert doc["sandbox"] is True
    assert doc["native"] == ["x86_64", "i386"]
    assert {"observe", "install", "register", "verify", "total"} <= set(doc["durations_ms"])
    assert doc["platforms"] == ["linux/amd64", "linux/386", "linux/riscv64", "linux/s390x"]
    state = json.loads((tmp_path / "state" / "state.json").read_text(encoding="utf-8"))
    rows = {row["arch"]: row for row in doc["arches"]}
    assert list(rows) == ["riscv64", "s390x"]
    for arch, row in rows.items():
        path = tmp_path / "qemu" / f"qemu-{arch}"
        digest = "blake3:" + blake3.blake3(path.read_bytes()).hexdigest()
        assert set(row) == {
            "arch",
            "platforms",
            "state",
            "registered",
            "enabled",
            "flags",
            "interpreter",
            "checksum",
            "qemu_version",
            "handler",
            "probe",
            "error",
            "working",
            "conflict",
        }
        assert row["handler"] == {
            "entry": f"qemu-{arch}",
            "interpreter": str(path),
            "owner": "binfmtd",
        }
        assert state["entries"][f"qemu-{arch}"].startswith(f":qemu-{arch}:M:0:")
        assert state["entries"][f"qemu-{arch}"].endswith(f":{path}:{row['flags']}")
        assert row["platforms"] == [f"linux/{arch}"]
        assert (row["state"], row["registered"], row["enabled"]) == ("verified", True, True)
        assert (row["flags"], row["interpreter"], row["error"]) == ("POF", str(path), None)
        assert row["checksum"] == digest == state["emulators"][arch]["checksum"]
        assert row["qemu_version"].startswith(f"qemu-{arch} version ")
        assert row["probe"]["ok"] is True and row["probe"]["error"] is None
        assert set(row["probe"]) == {"ok", "at", "duration_ms", "error"}


def test_composes_with_an_existing_private_instance_and_second_run_is_a_no_op(
    sandbox_sh: SandboxSh, tmp_path: Path
) -> None:
    """Without --sandbox binfmtd uses the mounted instance; a second run changes nothing."""
    arches = ["aarch64", "ppc64le", "s390x"]
    cfg = write_config(tmp_path, arches=arches, log={"level": "info", "format": "json"})
    before, (first, second) = provision(sandbox_sh, tmp_path, cfg, runs=2, args="--json")
    assert before == {}
    assert (first.code, second.code) == (0, 0), first.stderr + second.stderr
    assert set(first.entries) == {f"qemu-{a}" for a in arches}
    assert second.entries == first.entries
    for name, text in first.entries.items():
        assert "F" in parse_entry(name, text).flags
    first_events = [e["event"] for e in events(first.stderr)]
    assert first_events.count("entry_registered") == 3
    assert first_events.count("emulator_installed") == 3
    second_events = [e["event"] for e in events(second.stderr)]
    assert "entry_registered" not in second_events and "entry_removed" not in second_events
    assert "emulator_installed" not in second_events
    assert second.state == first.state  # nothing reinstalled: same records, same times
    doc = json.loads(second.stdout)
    assert doc["sandbox"] is False
    assert [row["state"] for row in doc["arches"]] == ["verified"] * 3


# ---------------------------------------------------------------- bad inputs change nothing


def bad_source(tmp_path: Path, data: bytes) -> Path:
    """A source directory whose qemu-aarch64-static holds `data`."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "qemu-aarch64-static").write_bytes(data)
    (src / "qemu-aarch64-static").chmod(0o755)
    return src


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda c, bb: Path(shutil.which("ls") or "/bin/ls").read_bytes(), "dynamically linked"),
        (lambda c, bb: bb.read_bytes(), "built for ELF machine 183, but this host needs 62"),
        (lambda c, bb: c.read_bytes()[:100_000], "truncated"),
    ],
    ids=["dynamic", "wrong-machine", "truncated"],
)
def test_unusable_qemu_is_refused_and_nothing_registered(
    sandbox_sh: SandboxSh,
    tmp_path: Path,
    qemu_dir: Path,
    busybox: Callable[[str], Path],
    make: Callable[[Path, Path], bytes],
    why: str,
) -> None:
    """A bad 'QEMU' in the source: clear error, exit 1, no entry, nothing in the install dir."""
    src = bad_source(tmp_path, make(qemu_dir / "qemu-aarch64-static", busybox("arm64")))
    cfg = write_config(tmp_path, arches=["aarch64"], source={"kind": "directory", "path": str(src)})
    _, (run,) = provision(sandbox_sh, tmp_path, cfg)
    assert run.code == Exit.ARCH_FAILED
    assert f"aarch64: error: qemu-aarch64 from the source is unusable: {why}" in run.stderr
    assert run.entries == {}
    assert installed_names(tmp_path) == []


def test_group_writable_install_dir_parent_is_refused(
    sandbox_sh: SandboxSh, tmp_path: Path
) -> None:
    """An install directory under a group-writable parent: clear error, nothing registered."""
    parent = tmp_path / "shared"
    parent.mkdir()
    parent.chmod(0o775)
    cfg = write_config(tmp_path, arches=["s390x"], install_dir=str(parent / "qemu"))
    _, (run,) = provision(sandbox_sh, tmp_path, cfg)
    assert run.code == Exit.ARCH_FAILED
    assert f"{parent} is writable by a non-root user" in run.stderr
    assert "chmod go-w" in run.stderr
    assert run.entries == {}
    assert not (parent / "qemu").exists()  # nothing is made below an untrusted directory


def test_missing_source_dir_is_a_clear_error(sandbox_sh: SandboxSh, tmp_path: Path) -> None:
    """A source directory that does not exist is named in the error; nothing registered."""
    missing = tmp_path / "no-such-dir"
    cfg = write_config(
        tmp_path, arches=["s390x"], source={"kind": "directory", "path": str(missing)}
    )
    _, (run,) = provision(sandbox_sh, tmp_path, cfg)
    assert run.code == Exit.ARCH_FAILED
    assert f"emulator source {missing} does not exist" in run.stderr
    assert run.entries == {}
    assert installed_names(tmp_path) == []


def test_malformed_config_exits_78_naming_the_line(sandbox_sh: SandboxSh, tmp_path: Path) -> None:
    """A config error exits 78 (EX_CONFIG) with file, line and key; nothing registered."""
    cfg = write_config(tmp_path, arches=["s390x"])
    cfg.write_text(cfg.read_text() + "probe:\n  parallelism: lots\n", encoding="utf-8")
    line = cfg.read_text().splitlines().index("  parallelism: lots") + 1
    _, (run,) = provision(sandbox_sh, tmp_path, cfg)
    assert run.code == 78
    assert f"bad configuration: {cfg}:{line}: probe.parallelism: expected a int" in run.stderr
    assert run.entries == {}
    assert installed_names(tmp_path) == []


def foreign_aarch64(cache: Cache) -> Registration:
    """An entry another tool would make: Debian's QEMU from the cache, flags F."""
    row = archmod.BY_NAME["aarch64"]
    interpreter = str(cache.qemu_dir / "qemu-aarch64-static")
    return Registration(row.entry_name, row.magic, row.mask, interpreter, "F")


def register_foreign(reg: Registration) -> str:
    """Shell that registers `reg` in the sandbox's instance."""
    return f"printf '%s' '{reg.register_string()}' > {ENTRIES}/register"


def test_conflicting_entry_is_left_alone_under_leave(
    sandbox_sh: SandboxSh, tmp_path: Path, cache: Cache
) -> None:
    """A foreign qemu-aarch64 under conflict_policy leave: reported, exit 1, left exactly as is."""
    foreign = foreign_aarch64(cache)
    cfg = write_config(tmp_path, arches=["aarch64", "s390x"])
    before, (run,) = provision(sandbox_sh, tmp_path, cfg, before=register_foreign(foreign))
    assert parse_entry("qemu-aarch64", before["qemu-aarch64"]).matches(foreign)
    assert run.code == Exit.ARCH_FAILED
    assert run.entries["qemu-aarch64"] == before["qemu-aarch64"]
    assert "entry qemu-aarch64 (" + foreign.interpreter + ") was made by another tool" in (
        run.stderr
    )
    assert "conflict_policy: replace" in run.stderr
    assert set(run.entries) == {"qemu-aarch64", "qemu-s390x"}
    assert installed_names(tmp_path) == ["qemu-s390x"]


def test_conflicting_entry_is_replaced_under_replace(
    sandbox_sh: SandboxSh, tmp_path: Path, cache: Cache
) -> None:
    """With conflict_policy replace the foreign entry gives way to ours, verified, exit 0."""
    cfg = write_config(tmp_path, arches=["aarch64"], conflict_policy="replace")
    _, (run,) = provision(
        sandbox_sh, tmp_path, cfg, before=register_foreign(foreign_aarch64(cache))
    )
    assert run.code == 0, run.stderr
    entry = parse_entry("qemu-aarch64", run.entries["qemu-aarch64"])
    assert (entry.interpreter, entry.flags) == (str(tmp_path / "qemu" / "qemu-aarch64"), "POF")
    assert table_rows(run.stdout)["aarch64"][2] == "verified"


def test_unmountable_binfmt_misc_exits_67(tmp_path: Path) -> None:
    """In a user namespace without its own mount namespace mounting fails: exit 67, a clear hint."""
    empty = tmp_path / "binfmt"
    empty.mkdir()
    cfg = write_config(tmp_path, arches=["s390x"], binfmt_misc=str(empty))
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", BINFMTD, "--oneshot", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 67, result.stderr
    assert f"binfmt_misc is not mounted at {empty} and mounting it failed" in result.stderr
    assert "mount -t binfmt_misc" in result.stderr
    assert os.listdir(empty) == []
    assert installed_names(tmp_path) == []


def test_kernel_too_old_is_exit_65() -> None:
    """Linux 4.4 lacks the F flag: preflight fails with exit code 65 and says to upgrade."""
    with pytest.raises(PreflightError) as info:
        check_kernel("4.4.0-210-generic")
    assert info.value.code == 65
    assert "needs Linux >= 4.8" in info.value.message
    check_kernel("4.8.0")
    check_kernel("6.18.44-fc")
