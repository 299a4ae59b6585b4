"""Hostile input: random and malicious text, paths, files, links and environments.

Parsers are fed random input with hypothesis and may only answer with their own error types;
the running daemon is fed malicious API paths, planted links and hostile environments, and must
neither register nor execute anything it should not. Set HOSTILE_COUNT_FILE=<path> to get the
number of hostile inputs tried written there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import stat
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import daemonutil as du
import pytest
import yaml
from conftest import daemon_config, write_config
from daemonutil import SandboxSh, checksum_file, run_daemon, run_oneshot, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from binfmtd import arch as archmod
from binfmtd import config as configmod
from binfmtd import run as runmod
from binfmtd.binfmt import (
    FLAG_ORDER,
    MAX_INTERPRETER_LENGTH,
    NAME_RE,
    Entry,
    FormatError,
    Registration,
    parse_entry,
    parse_register_string,
)
from binfmtd.preflight import Exit
from binfmtd.protocol import NEED_MORE, Connection, NeedMore, ProtocolError, Request
from binfmtd.routes import Mutation, Reject, route

TRIED: Counter[str] = Counter()


EXAMPLES = 300


@pytest.fixture(scope="module", autouse=True)
def count_report() -> Iterator[None]:
    """Writes the number of hostile inputs tried to $HOSTILE_COUNT_FILE, when set."""
    yield
    target = os.environ.get("HOSTILE_COUNT_FILE")
    if target:
        lines = [f"{k} {v}" for k, v in sorted(TRIED.items())]
        Path(target).write_text("\n".join([*lines, f"total {sum(TRIED.values())}"]) + "\n")


# ---------------------------------------------------------------- pure parsers, random input

names = st.from_regex(NAME_RE, fullmatch=True).filter(lambda n: n not in {"register", "status"})
path_chars = st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters=":\\")
interpreters = st.text(path_chars, min_size=1, max_size=MAX_INTERPRETER_LENGTH - 1).map(
    lambda t: "/" + t
)
flag_sets = st.sets(st.sampled_from(FLAG_ORDER)).map(lambda s: "".join(sorted(s)) + "F")


@st.composite
def registrations(draw: st.DrawFn) -> Registration:
    """Valid registrations: any name, magic/mask bytes (':' and '\\n' included), path, flags."""
    magic = draw(st.binary(min_size=1, max_size=128))
    mask = draw(st.binary(min_size=len(magic), max_size=len(magic)))
    return Registration(draw(names), magic, mask, draw(interpreters), draw(flag_sets))


@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow])
@given(registrations())
def test_register_string_round_trips(reg: Registration) -> None:
    """Formatting then parsing a register string gives back the same registration, always."""
    TRIED["register_string_round_trip"] += 1
    line = reg.register_string()
    assert "\n" not in line and line.count(":") == 7
    assert parse_register_string(line) == reg


@settings(max_examples=EXAMPLES)
@given(st.text(max_size=400) | st.binary(max_size=400).map(lambda b: b.decode("latin-1")))
def test_register_string_parser_on_random_text(text: str) -> None:
    """The register-string parser answers random text with a Registration or FormatError only."""
    TRIED["register_string_parser"] += 1
    with contextlib.suppress(FormatError):
        assert isinstance(parse_register_string(text), Registration)


entry_lines = st.lists(
    st.sampled_from(["interpreter", "flags:", "offset", "magic", "mask", "extension", "x"]).flatmap(
        lambda key: st.text(max_size=40).map(lambda value: f"{key} {value}")
    ),
    max_size=8,
)


@settings(max_examples=EXAMPLES)
@given(
    st.sampled_from(["enabled", "disabled", "", "enabled\r", "junk"]),
    entry_lines,
    st.text(max_size=200),
)
def test_entry_parser_on_random_text(first: str, lines: list[str], noise: str) -> None:
    """parse_entry on random entry-shaped text and noise: an Entry or FormatError, nothing else."""
    TRIED["entry_parser"] += 1
    for text in ("\n".join([first, *lines]), noise, first + "\n" + noise):
        with contextlib.suppress(FormatError):
            assert isinstance(parse_entry("qemu-x", text), Entry)


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)
config_keys = st.sampled_from(
    [f.name for f in dataclasses.fields(configmod.Config)] + ["source", "junk"]
)
config_docs = st.dictionaries(config_keys, json_like, max_size=6)


@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow])
@given(config_docs | json_like, st.text(max_size=300))
def test_config_loader_on_random_yaml_and_text(doc: Any, text: str) -> None:
    """config.parse on random YAML documents and random text raises only ConfigError."""
    TRIED["config_loader"] += 2
    for source in (yaml.safe_dump(doc), text):
        with contextlib.suppress(configmod.ConfigError):
            assert isinstance(configmod.parse(source, "hostile.yaml"), configmod.Config)


GOOD_REQUEST = (
    b'POST /v1/verify HTTP/1.1\r\nHost: x\r\nContent-Length: 22\r\n\r\n{"arches":["aarch64"]}'
)


@settings(max_examples=EXAMPLES)
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_http_parser_on_random_bytes_in_random_chunks(chunks: list[bytes]) -> None:
    """h11 on random bytes in random chunks: Request, NeedMore or ProtocolError only."""
    TRIED["http_random"] += 1
    reader = Connection()
    for chunk in chunks:
        reader.feed(chunk)
        for _ in range(4):
            parsed = reader.next_request()
            assert isinstance(parsed, Request | NeedMore | ProtocolError)
            if isinstance(parsed, NeedMore):
                break
            reader.respond(200 if isinstance(parsed, Request) else parsed.status, b"{}\n")


@settings(max_examples=EXAMPLES)
@given(st.integers(0, len(GOOD_REQUEST) - 1), st.binary(max_size=50))
def test_http_parser_on_truncated_and_mangled_requests(cut: int, junk: bytes) -> None:
    """Every strict prefix of a valid request is NeedMore; a prefix plus junk never raises."""
    TRIED["http_truncated"] += 2
    reader = Connection()
    reader.feed(GOOD_REQUEST[:cut])
    assert reader.next_request() is NEED_MORE
    reader.feed(junk)
    assert isinstance(reader.next_request(), Request | NeedMore | ProtocolError)


segments = st.text(
    st.characters(min_codepoint=0, max_codepoint=0x7F), min_size=0, max_size=40
) | st.sampled_from(["..", ".", "..%2Fx", "a:b", "a\nb", "", "x" * 33, "aarch64/..", "%00"])


@settings(max_examples=EXAMPLES)
@given(segments, st.sampled_from(["enable", "disable"]))
def test_router_never_passes_an_invalid_arch_name(segment: str, action: str) -> None:
    """route() sends only catalog QEMU names to the daemon; the rest is a 4xx Reject."""
    TRIED["router"] += 1
    request = Request("POST", f"/v1/arches/{segment}/{action}", {}, {"host": "x"}, b"", False)
    target = route(request)
    if isinstance(target, Mutation):
        name = target.arg["arch"]
        assert name in archmod.BY_NAME and name == archmod.canonical(segment)
    else:
        assert isinstance(target, Reject) and 400 <= target.status < 500


# ---------------------------------------------------------------- hostile arch names

BAD_ARCH_NAMES = ["../x", "a:b", "a\nb", "", "x" * 33, "aarch64/../s390x", "AARCH64", "aarch64 "]


@pytest.mark.parametrize("name", BAD_ARCH_NAMES)
def test_bad_arch_names_in_config_are_config_errors(name: str) -> None:
    """A hostile arch name in arches/exclude is a ConfigError naming it, never a path."""
    TRIED["config_arch_names"] += 2
    for key in ("arches", "exclude"):
        problem = "unknown architecture|control characters"
        with pytest.raises(configmod.ConfigError, match=problem):
            configmod.parse(yaml.safe_dump({key: [name]}), "hostile.yaml")


BAD_API_PATHS = [
    "/v1/arches/..%2Fx/enable",
    "/v1/arches/../x/enable",
    "/v1/arches/%2e%2e/disable",
    "/v1/arches/a:b/disable",
    "/v1/arches/a%0Ab/disable",
    "/v1/arches//disable",
    "/v1/arches/" + "x" * 33 + "/disable",
    "/v1/arches/aarch64%2F..%2Fs390x/disable",
    "/v1/arches/s390x%00/disable",
    "/v1/arches/AARCH64/disable",
    "/v1/arches/riscv64/disable",
    "/v1/arches/aarch64/disable/extra",
    "/v1/arches/aarch64/DISABLE",
    "/v1/../v1/arches/aarch64/disable",
    "/v1/arches/aarch64%20/disable",
]


def test_hostile_api_paths_and_bodies_are_4xx_and_change_nothing(
    daemons: list[du.Daemon], tmp_path: Path
) -> None:
    """Traversal, separators, NUL, 33-char names in API paths and bodies: 4xx, no state change."""
    daemon = run_daemon(daemons, daemon_config(tmp_path))
    daemon.wait_verified(["aarch64", "s390x"])
    for target in BAD_API_PATHS:
        code, answer = daemon.post(target)
        assert 400 <= code < 500, (target, code, answer)
        TRIED["api_paths"] += 1
    bodies = [b'{"arches": ["../x"]}', b'{"arches": "aarch64"}', b"[" * 5000, b'{"x": 1}', b"\x00"]
    for body in bodies:
        code, answer = daemon.post("/v1/verify", body)
        assert code in {400, 404}, (body[:20], code, answer)  # 404: unknown arch name
        TRIED["api_bodies"] += 1
    code, _ = daemon.get("/v1/platforms?format=../../etc/passwd")
    assert code == 400
    rows = daemon.arches()
    assert all(row["state"] == "verified" for row in rows.values()), rows
    assert not daemon.events("entry_disabled") and not daemon.events("entry_removed")
    listed = daemon.ns_ok("ls /proc/sys/fs/binfmt_misc").stdout.split()
    assert sorted(listed) == ["qemu-aarch64", "qemu-s390x", "register", "status"]


# ---------------------------------------------------------------- paths, links, modes


def test_interpreter_path_over_127_bytes_is_a_clear_config_error(tmp_path: Path) -> None:
    """install_dir pushing qemu-<arch> past 127 bytes: exit 78 before any kernel call."""
    TRIED["long_install_dir"] += 1
    long_dir = tmp_path / ("d" * 120) / "qemu"
    cfg = write_config(tmp_path, arches=["s390x"], install_dir=str(long_dir))
    result = du.run([*du.sandbox_argv(cfg), "--oneshot"], 60)
    assert result.returncode == Exit.CONFIG, result.stderr
    assert "install_dir: interpreter path is" in result.stderr
    assert "binfmt_misc takes at most 127" in result.stderr
    assert "Traceback" not in result.stderr
    assert not long_dir.exists()


def test_links_planted_before_the_first_install_are_never_registered(
    sandbox_sh: SandboxSh, tmp_path: Path, qemu_dir: Path
) -> None:
    """Planted symlink and hard link: replaced by our own installs, targets intact."""
    TRIED["planted_links_cold"] += 2
    victims = tmp_path / "victims"
    victims.mkdir()
    shutil.copyfile("/bin/sh", victims / "sh")
    shutil.copyfile(qemu_dir / "qemu-s390x-static", victims / "root-owned")
    before = {p.name: checksum_file(p) for p in victims.iterdir()}
    install = tmp_path / "qemu"
    install.mkdir(mode=0o755)
    (install / "qemu-aarch64").symlink_to(victims / "sh")
    os.link(victims / "root-owned", install / "qemu-s390x")
    cfg = write_config(tmp_path, arches=["aarch64", "s390x"])
    run = run_oneshot(sandbox_sh, tmp_path, cfg)
    assert run["rc"] == 0, run["stderr"]
    assert_regular_installs(install, qemu_dir, ["aarch64", "s390x"])
    assert {p.name: checksum_file(p) for p in victims.iterdir()} == before
    assert os.stat(victims / "root-owned").st_nlink == 1


def ours(path: Path, qemu_dir: Path, arch: str) -> bool:
    """A regular file with one link, or a hard link to the source itself (a link install)."""
    st_ = os.lstat(path)
    source = os.stat(qemu_dir / f"qemu-{arch}-static")
    linked = (st_.st_dev, st_.st_ino) == (source.st_dev, source.st_ino)
    return stat.S_ISREG(st_.st_mode) and (st_.st_nlink == 1 or linked)


def assert_regular_installs(install: Path, qemu_dir: Path, arches: list[str]) -> None:
    """Each interpreter: ours (copy or link to the source), root-owned, not group/world-writable,
    right sha."""
    for arch in arches:
        st_ = os.lstat(install / f"qemu-{arch}")
        assert ours(install / f"qemu-{arch}", qemu_dir, arch) and st_.st_uid == 0
        assert not st_.st_mode & 0o022
        assert checksum_file(install / f"qemu-{arch}") == checksum_file(
            qemu_dir / f"qemu-{arch}-static"
        )


def test_links_planted_under_a_running_daemon_are_replaced(
    daemons: list[du.Daemon], tmp_path: Path, qemu_dir: Path
) -> None:
    """Same-content symlink and hard link swapped in: the daemon re-installs regular files."""
    TRIED["planted_links_running"] += 2
    daemon = run_daemon(daemons, daemon_config(tmp_path))
    daemon.wait_verified(["aarch64", "s390x"])
    install = Path(daemon.install_dir)
    twin = tmp_path / "twin-aarch64"
    shutil.copyfile(install / "qemu-aarch64", twin)
    twin.chmod(0o755)
    hard = tmp_path / "hard-s390x"
    shutil.copyfile(install / "qemu-s390x", hard)
    hard.chmod(0o755)
    planted = install / "planted"
    planted.symlink_to(twin)
    planted.rename(install / "qemu-aarch64")
    os.link(hard, planted)
    planted.rename(install / "qemu-s390x")
    before = len(daemon.events("emulator_installed"))

    def replaced() -> bool:
        regular = all(
            not (install / f"qemu-{a}").is_symlink() and ours(install / f"qemu-{a}", qemu_dir, a)
            for a in ("aarch64", "s390x")
        )
        return regular and len(daemon.events("emulator_installed")) >= before + 2

    wait_until("both planted links replaced", replaced, 20)
    daemon.wait_verified(["aarch64", "s390x"])
    assert_regular_installs(install, qemu_dir, ["aarch64", "s390x"])
    assert os.stat(hard).st_nlink == 1


@pytest.mark.parametrize(("mode", "owner"), [(0o666, 0), (0o664, 0), (0o646, 0), (0o644, 65534)])
def test_unsafe_config_file_is_refused_as_root(tmp_path: Path, mode: int, owner: int) -> None:
    """As real root, a config writable by others or not owned by root: exit 78, nothing done."""
    TRIED["unsafe_config_modes"] += 1
    assert os.geteuid() == 0
    cfg = write_config(tmp_path, arches=["s390x"])
    os.chown(cfg, owner, -1)
    cfg.chmod(mode)
    # Straight from the host's root (the check applies only in the initial user namespace):
    # the refusal happens before --sandbox would create anything.
    result = du.run([*du.sandbox_argv(cfg, outer=False), "--oneshot"], 60)
    assert result.returncode == Exit.CONFIG, result.stderr
    assert "refusing this configuration" in result.stderr
    assert f"chown root: {cfg} && chmod go-w {cfg}" in result.stderr
    assert result.stderr.count("run `") == 1  # one fix, not two different ones
    assert not (tmp_path / "qemu").exists()


# ---------------------------------------------------------------- hostile environment

FAKE_CHROOT = """#!/bin/sh
echo "$0 $*" >> {marker}
exit 0
"""


def hostile_env(evil: Path) -> dict[str, str]:
    """An environment an attacker would like a root daemon to pass on."""
    return {
        "PATH": f"{evil}:/usr/sbin:/usr/bin:/sbin:/bin",
        "LD_PRELOAD": "/nonexistent.so",
        "LD_LIBRARY_PATH": str(evil),
        "PYTHONPATH": str(evil),
        "IFS": "/",
        "BASH_ENV": str(evil / "bashenv"),
        "ENV": str(evil / "bashenv"),
        "QEMU_LD_PREFIX": str(evil),
        "QEMU_STRACE": "1",
        "TMPDIR": str(evil / "tmp"),
        "LC_ALL": "C.UTF-8",
    }


def test_hostile_environment_never_reaches_subprocesses(tmp_path: Path) -> None:
    """LD_PRELOAD, PATH with a fake chroot, PYTHONPATH, IFS...: fake never runs, probes pass."""
    TRIED["hostile_environment"] += len(hostile_env(tmp_path))
    evil = tmp_path / "evil"
    (evil / "tmp").mkdir(parents=True)
    marker = tmp_path / "chroot-was-run"
    for tool in ("chroot", "sh", "env"):
        (evil / tool).write_text(FAKE_CHROOT.format(marker=marker))
        (evil / tool).chmod(0o755)
    (evil / "bashenv").write_text(f"touch {marker}\n")
    cfg = write_config(tmp_path, arches=["aarch64", "s390x"])
    result = du.run([*du.sandbox_argv(cfg), "--oneshot", "--json"], 120, hostile_env(evil))
    assert result.returncode == 0, result.stderr
    assert not marker.exists(), marker.read_text()
    assert '"state": "verified"' in result.stdout


def test_the_subprocess_funnel_passes_only_the_minimal_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Whatever the daemon's environment holds, run() gives children PATH, LC_ALL and HOME only."""
    for key, value in hostile_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("LD_PRELOAD")  # keep /usr/bin/env itself quiet
    result = runmod.run(["/usr/bin/env"], timeout=10)
    lines = sorted(result.stdout.decode().splitlines())
    assert lines == sorted(f"{k}={v}" for k, v in runmod.minimal_env().items())
    assert runmod.minimal_env()["PATH"] == runmod.SAFE_PATH
