"""Configuration: defaults, every option, errors that name file, line and key; safe mode."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import LocalUser
from daemonutil import SYSTEM_PYTHON, wait_until
from hypothesis import given
from hypothesis import strategies as st

from binfmtd import config
from binfmtd.config import (
    ApiConfig,
    BuildkitConfig,
    Config,
    ConfigError,
    ConflictPolicy,
    InstallMethod,
    LogConfig,
    LogFormat,
    ProbeConfig,
    SourceConfig,
    SourceKind,
)

FULL = """\
binfmt_misc: /mnt/binfmt
install_dir: /opt/binfmtd/qemu
state_file: /opt/binfmtd/state.json
arches: [aarch64, riscv64, s390x]
exclude: [s390x]
flags: F
conflict_policy: replace
install_method: copy
reconcile_interval_s: 2.5
reverify_interval_s: 120
remove_on_stop: true
lock_file: /run/x/binfmtd.lock
source:
  kind: deb
  path: /srv/qemu-user-static.deb
  retry_initial_s: 1
  retry_max_s: 60
probe:
  timeout_s: 3
  parallelism: 2
api:
  socket: /run/x/binfmtd.sock
  group: builders
  metrics_port: 9723
log:
  level: debug
  format: json
buildkit:
  enabled: true
  path: /usr/local/bin/buildkitd
  socket: /run/x/buildkitd.sock
  state_dir: /var/lib/x/buildkit
  config_path: /run/x/buildkitd.toml
  base_config: /etc/x/buildkitd.toml
  extra_args: [--debug, --oci-worker-gc=false]
  containerd_worker: true
  socket_group: ~
  grace_s: 5
  debounce_s: 0.5
  backoff_initial_s: 0.25
  backoff_max_s: 10
  max_failures: 3
  start_timeout_s: 12
  health_interval_s: 1
  stable_s: 30
"""


def error_of(text: str, path: str = "/etc/binfmtd/x.yaml") -> str:
    """The ConfigError message `text` produces."""
    with pytest.raises(ConfigError) as info:
        config.parse(text, path)
    return str(info.value)


def test_defaults() -> None:
    """No file, an empty file and an all-comment file all give the documented defaults."""
    cfg = config.load(None)
    assert cfg == Config()
    assert cfg.binfmt_misc == "/proc/sys/fs/binfmt_misc"
    assert cfg.install_dir == "/var/lib/binfmtd/qemu"
    assert cfg.arches == ("all",) and cfg.exclude == ()
    assert cfg.flags == "POF" and cfg.conflict_policy is ConflictPolicy.LEAVE
    assert cfg.source == SourceConfig(SourceKind.AUTO, None)
    assert cfg.log == LogConfig("info", LogFormat.AUTO)
    assert cfg.install_method is InstallMethod.AUTO
    assert config.parse("", "e.yaml") == dataclasses.replace(Config(), config_file="e.yaml")
    assert config.parse("# nothing\n", "c.yaml").install_dir == cfg.install_dir


def test_safety_pass_defaults_to_thirty_seconds_and_is_configurable() -> None:
    """Events drive reconcile; the safety pass runs every 30 s unless set (within its limits)."""
    assert Config().reconcile_interval_s == 30.0
    assert config.parse("reconcile_interval_s: 60\n").reconcile_interval_s == 60.0
    assert "between 0.05 and 3600" in error_of("reconcile_interval_s: 7200\n")


def test_every_option_in_a_full_yaml() -> None:
    """A file setting every option yields exactly those values, with the right types."""
    cfg = config.parse(FULL, "/etc/binfmtd/full.yaml")
    expected = Config(
        binfmt_misc="/mnt/binfmt",
        install_dir="/opt/binfmtd/qemu",
        state_file="/opt/binfmtd/state.json",
        arches=("aarch64", "riscv64", "s390x"),
        exclude=("s390x",),
        flags="F",
        conflict_policy=ConflictPolicy.REPLACE,
        install_method=InstallMethod.COPY,
        reconcile_interval_s=2.5,
        reverify_interval_s=120.0,
        remove_on_stop=True,
        lock_file="/run/x/binfmtd.lock",
        source=SourceConfig(SourceKind.DEB, "/srv/qemu-user-static.deb", 1.0, 60.0),
        probe=ProbeConfig(timeout_s=3.0, parallelism=2),
        api=ApiConfig("/run/x/binfmtd.sock", "builders", 9723),
        log=LogConfig("debug", LogFormat.JSON),
        buildkit=BuildkitConfig(
            enabled=True,
            path="/usr/local/bin/buildkitd",
            socket="/run/x/buildkitd.sock",
            state_dir="/var/lib/x/buildkit",
            config_path="/run/x/buildkitd.toml",
            base_config="/etc/x/buildkitd.toml",
            extra_args=("--debug", "--oci-worker-gc=false"),
            containerd_worker=True,
            socket_group=None,
            grace_s=5.0,
            debounce_s=0.5,
            backoff_initial_s=0.25,
            backoff_max_s=10.0,
            max_failures=3,
            start_timeout_s=12.0,
            health_interval_s=1.0,
            stable_s=30.0,
        ),
        config_file="/etc/binfmtd/full.yaml",
    )
    assert cfg == expected
    assert isinstance(cfg.probe.timeout_s, float) and isinstance(cfg.probe.parallelism, int)
    assert cfg.selected(native=("riscv64",)) == ("aarch64",)


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("source: {kind: deb, path: q.deb}", "source.path: must be an absolute path"),
        ("source: {retry_initial_s: 10, retry_max_s: 5}", "must not be below"),
        ("source: {retry_initial_s: 0}", "retry_initial_s: must be between"),
        ("source: {retry_max_s: 100000}", "retry_max_s: must be between"),
    ],
)
def test_source_keys_are_validated(text: str, detail: str) -> None:
    """A relative source path or a backoff that makes no sense is a config error."""
    assert detail in error_of(text)


def test_full_yaml_covers_every_option() -> None:
    """The full example names every field of every section (a new option needs a test)."""
    data = yaml.safe_load(FULL)

    def missing(cls: type[Any], section: dict[str, Any], prefix: str) -> set[str]:
        names = {f.name for f in dataclasses.fields(cls) if f.name != "config_file"}
        out = {prefix + n for n in names - set(section)}
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type) or f.name in {"source", "probe", "api", "log"}:
                sub = type(getattr(cls(), f.name))
                out |= missing(sub, section.get(f.name, {}), prefix + f.name + ".")
        return out

    assert missing(Config, data, "") == set()


@pytest.mark.parametrize(
    ("text", "line", "key", "detail"),
    [
        ("install_dir: /x\nbogus: 1\n", 2, "bogus", "unknown key"),
        ("probe:\n  timeout_s: 1\n  tiemout_s: 2\n", 3, "probe.tiemout_s", "unknown key"),
        ("flags: F\nflags: FP\n", 2, "flags", "duplicate key"),
        ("probe:\n  parallelism: many\n", 2, "probe.parallelism", "expected a int"),
        ("probe:\n  parallelism: 2.5\n", 2, "probe.parallelism", "expected a int"),
        ("remove_on_stop: 'yes'\n", 1, "remove_on_stop", "expected a bool"),
        ("reconcile_interval_s: true\n", 1, "reconcile_interval_s", "expected a float"),
        ("install_dir: 5\n", 1, "install_dir", "expected a str"),
        ("install_dir: ~\n", 1, "install_dir", "expected a str"),
        ("arches: aarch64\n", 1, "arches", "expected a list"),
        ("arches: [aarch64, [x]]\n", 1, "arches", "expected a str"),
        ("source: directory\n", 1, "source", "expected a mapping"),
        ("\n\nconflict_policy: maybe\n", 3, "conflict_policy", "'maybe' is not one of"),
        ("source:\n  kind: tarball\n", 2, "source.kind", "is not one of: auto, directory, deb"),
        ("log:\n  format: xml\n", 2, "log.format", "is not one of"),
        ("probe:\n  parallelism: 0\n", 2, "probe.parallelism", "between 1 and 64"),
        ("probe:\n  timeout_s: 601\n", 2, "probe.timeout_s", "between 0.1 and 600"),
        ("probe:\n  timeout_s: .nan\n", 2, "probe.timeout_s", "between"),
        ("reconcile_interval_s: 0.001\n", 1, "reconcile_interval_s", "between"),
        ("install_method: hardlink\n", 1, "install_method", "not one of: auto, copy"),
        ("- a\n- b\n", 1, "<top>", "expected a mapping"),
    ],
)
def test_errors_name_file_line_and_key(text: str, line: int, key: str, detail: str) -> None:
    """Unknown keys, wrong types, bad enums and out-of-range values say `file:LINE: key: why`."""
    message = error_of(text)
    assert message.startswith(f"/etc/binfmtd/x.yaml:{line}: {key}: "), message
    assert detail in message


def test_invalid_yaml_names_the_file_and_position() -> None:
    """A YAML syntax error names the file and where the parser stopped."""
    message = error_of("install_dir: [unclosed\n")
    assert message.startswith("/etc/binfmtd/x.yaml: not valid YAML")
    assert "line" in message


def test_docker_and_qemu_names_resolve_to_the_catalog() -> None:
    """`arches`/`exclude` take Docker/OCI, Debian and QEMU names; QEMU names come out, once."""
    cfg = config.parse("arches: [arm64, linux/arm/v7, aarch64, 386, loong64]\nexclude: [armhf]\n")
    assert cfg.arches == ("aarch64", "arm", "i386", "loongarch64")
    assert cfg.exclude == ("arm",)
    assert cfg.selected(()) == ("aarch64", "i386", "loongarch64")


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("arches: [aarch64, arn64]\n", "arches: unknown architecture 'arn64'; did you mean arm64"),
        ("exclude: [sparc128]\n", "unknown architecture 'sparc128'"),
        ("flags: PC\n", "flags: must include F"),
        ("flags: FZ\n", "flags: unknown binfmt flag"),
        ("install_dir: var/lib/q\n", "install_dir: must be an absolute path"),
        ("source:\n  kind: directory\n", "source.path: required"),
    ],
)
def test_semantic_errors_name_file_and_key(text: str, detail: str) -> None:
    """Unknown arch names, flags without F, relative paths and a source without a path."""
    message = error_of(text)
    assert message.startswith("/etc/binfmtd/x.yaml"), message
    assert detail in message, message


@pytest.mark.parametrize(
    "text",
    ["flags: !foo F\n", "probe:\n  parallelism: !!int many\n", "install_dir: !!binary AAAA\n"],
)
def test_odd_tags_are_config_errors(text: str) -> None:
    """Explicit YAML tags that cannot be constructed are reported as configuration errors."""
    assert error_of(text).startswith("/etc/binfmtd/x.yaml:")


yamlish = st.text(
    st.sampled_from(list("abcdefgiklmnoprstuvxyz_019 :-[]{},'\"\n!#&*~.|>?%@`\t")), max_size=120
)
keyed = st.lists(
    st.tuples(
        st.sampled_from(
            [f.name for f in dataclasses.fields(Config)]
            + ["probe:\n  timeout_s", "source:\n  kind", "buildkit:\n  grace_s", "api:\n  group"]
        ),
        yamlish,
    ),
    max_size=5,
).map(lambda pairs: "".join(f"{k}: {v}\n" for k, v in pairs))


@given(yamlish | keyed)
def test_random_yamlish_text_only_raises_config_error(text: str) -> None:
    """Whatever the text, parse returns a Config or raises ConfigError, nothing else."""
    with contextlib.suppress(ConfigError):
        assert isinstance(config.parse(text, "fuzz.yaml"), Config)


def test_load_reports_unreadable_and_non_utf8(tmp_path: Path) -> None:
    """A missing file or non-UTF-8 bytes become ConfigErrors naming the file."""
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read configuration"):
        config.load(str(tmp_path / "nope.yaml"))
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"install_dir: /caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(str(latin))


@pytest.mark.parametrize(("mode", "uid"), [(0o664, 0), (0o646, 0), (0o644, 1000)])
def test_unsafe_config_refused_in_safe_mode(tmp_path: Path, mode: int, uid: int) -> None:
    """require_safe_mode refuses a config writable by group/others or not owned by root."""
    path = tmp_path / "binfmtd.yaml"
    path.write_text("flags: FPC\n", encoding="utf-8")
    os.chown(path, uid, 0)
    path.chmod(mode)
    with pytest.raises(ConfigError, match="refusing this configuration") as info:
        config.load(str(path), require_safe_mode=True)
    assert f"chown root: {path}" in str(info.value)
    assert config.load(str(path)).flags == "FPC"  # without safe mode it is read


def test_safe_config_accepted_in_safe_mode(tmp_path: Path) -> None:
    """A root-owned 0644 config passes safe mode."""
    path = tmp_path / "binfmtd.yaml"
    path.write_text("arches: [s390x]\n", encoding="utf-8")
    path.chmod(0o644)
    assert config.load(str(path), require_safe_mode=True).arches == ("s390x",)


def test_selected_honours_all_exclude_and_native() -> None:
    """`all` expands to the catalog; excluded and native arches drop out."""
    cfg = config.parse("exclude: [cris, hexagon]\n")
    chosen = cfg.selected(native=("x86_64", "i386"))
    assert len(chosen) == 35 - 4
    assert not {"cris", "hexagon", "x86_64", "i386"} & set(chosen)


def test_for_sandbox_moves_only_default_paths() -> None:
    """--sandbox moves default install/state/lock/socket paths aside and keeps explicit ones."""
    moved = config.for_sandbox(Config(), "/run/s/a", "/var/lib/s/a")
    assert moved.install_dir == "/var/lib/s/a/qemu"
    assert moved.api.socket == "/run/s/a/binfmtd.sock"
    assert moved.lock_file == "/run/s/a/binfmtd.lock"
    assert moved.buildkit.state_dir == "/var/lib/s/a/buildkit"
    kept = config.for_sandbox(Config(install_dir="/srv/q"), "/run/s/a", "/var/lib/s/a")
    assert kept.install_dir == "/srv/q"
    assert kept.state_file == "/var/lib/s/a/state.json"


def test_config_in_a_user_directory_refused(tmp_path: Path, local_user: LocalUser) -> None:
    """A root-owned 0644 config in a directory a user owns is refused: they could swap it."""
    theirs = tmp_path / "etc"
    theirs.mkdir()
    path = theirs / "binfmtd.yaml"
    path.write_text("arches: [s390x]\n", encoding="utf-8")
    path.chmod(0o644)
    os.chown(theirs, local_user.uid, local_user.gid)
    with pytest.raises(ConfigError, match="refusing this configuration") as info:
        config.load(str(path), require_safe_mode=True)
    assert f"chown root: {theirs} && chmod go-w {theirs}" in str(info.value)


def test_config_rename_race_never_accepts_the_users_file(local_user: LocalUser) -> None:
    """A user renaming their config over root's in a loop never gets theirs loaded (was 10 %)."""
    base = Path(tempfile.mkdtemp(prefix="binfmtd-cfg-"))
    try:
        base.chmod(0o755)
        theirs = base / "etc"
        theirs.mkdir()
        (theirs / "good").write_text("arches: [s390x]\n", encoding="utf-8")
        (theirs / "evil").write_text("arches: [aarch64]\n", encoding="utf-8")
        (theirs / "good").chmod(0o644)
        (theirs / "evil").chmod(0o644)
        os.chown(theirs, local_user.uid, local_user.gid)
        os.chown(theirs / "evil", local_user.uid, local_user.gid)
        first = (theirs / "good").stat().st_ino
        swapper = local_user.popen([SYSTEM_PYTHON, "-I", "-c", SWAPPER, str(theirs)])
        loaded = Counter[str]()
        try:
            wait_until("the swapper to run", lambda: _inode(theirs / "good") != first, 10)
            for _ in range(20000):
                try:
                    loaded[config.load(str(theirs / "good"), require_safe_mode=True).arches[0]] += 1
                except ConfigError:
                    loaded["refused"] += 1
        finally:
            swapper.kill()
            swapper.wait()
        assert loaded["aarch64"] == 0, loaded
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


SWAPPER = """
import os, sys
d = sys.argv[1]
while True:
    try:
        os.rename(d + "/good", d + "/tmp"); os.rename(d + "/evil", d + "/good")
        os.rename(d + "/good", d + "/evil"); os.rename(d + "/tmp", d + "/good")
    except OSError:
        pass
"""


def test_state_file_in_a_world_writable_directory_refused(tmp_path: Path) -> None:
    """Safe mode: state_file's directory must pass the trust rule at load, before any install."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # world-writable, not sticky: anyone may replace root's state file
    path = tmp_path / "binfmtd.yaml"
    path.write_text(f"state_file: {shared}/state.json\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="state_file: ") as info:
        config.load(str(path), require_safe_mode=True)
    assert f"chown root: {shared} && chmod go-w {shared}" in str(info.value)
    missing = tmp_path / "binfmtd2.yaml"  # a missing directory: its nearest parent is checked
    missing.write_text(f"state_file: {shared}/new/state.json\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="state_file: "):
        config.load(str(missing), require_safe_mode=True)
    shared.chmod(0o755)
    assert config.load(str(path), require_safe_mode=True).state_file == f"{shared}/state.json"


def test_state_file_behind_a_symbolic_link_refused_at_load(tmp_path: Path) -> None:
    """Safe mode: a state_file whose directory is reached through a symbolic link is refused
    at load (exit 78), naming the link and the path to use. Before, it was accepted, and then
    binfmtd never read the state file it wrote (refused there as a link: each restart
    reinstalled every emulator) and every probe failed ("probe roots refused"): every arch
    failed, forever, with the daemon running."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "state").symlink_to(real)
    path = tmp_path / "binfmtd.yaml"
    path.write_text(f"state_file: {tmp_path}/state/state.json\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"state_file: .* is a symbolic link") as info:
        config.load(str(path), require_safe_mode=True)
    assert "use the path it points to" in str(info.value)
    path.write_text(f"state_file: {real}/state.json\n", encoding="utf-8")
    assert config.load(str(path), require_safe_mode=True).state_file == f"{real}/state.json"


def test_relative_config_is_resolved_and_refused_for_its_real_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--config c.yaml` is read from the cwd; refusals give one reason and one fix."""
    from binfmtd import daemon

    monkeypatch.setattr(daemon, "_safe_mode", True)
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("arches: [s390x]\n", encoding="utf-8")
    cfg.chmod(0o666)
    assert daemon.main(["--config", "c.yaml", "--oneshot"]) == 78
    err = capsys.readouterr().err
    assert "absolute path" not in err
    assert f"{cfg} is writable by a non-root user" in err
    assert err.count("run `") == 1 and f"chown root: {cfg} && chmod go-w {cfg}" in err
    (tmp_path / "d.yaml").mkdir()
    assert daemon.main(["--config", "d.yaml", "--oneshot"]) == 78
    err = capsys.readouterr().err
    assert f"{tmp_path / 'd.yaml'} is not a regular file" in err
    assert "writable" not in err


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "install_dir: /srv/q\nstate_file: /srv/q/qemu-aarch64\n",
            "state_file: /srv/q/qemu-aarch64 is inside install_dir /srv/q",
        ),
        (
            "install_dir: /srv/q\nlock_file: /srv/q/qemu-s390x\n",
            "lock_file: /srv/q/qemu-s390x is inside install_dir /srv/q",
        ),
        (
            "state_file: /srv/s.json\nlock_file: /srv/./s.json\n",
            "state_file and lock_file: must be different files, both are /srv/s.json",
        ),
        (
            "lock_file: /srv/l\napi: {socket: /srv/l}\n",
            "lock_file and api.socket: must be different files",
        ),
        ("state_file: /srv/state/\n", "state_file: must name a file, not a directory"),
        (
            "install_dir: /proc/sys/fs/binfmt_misc/q\n",
            "install_dir: /proc/sys/fs/binfmt_misc/q is inside binfmt_misc",
        ),
        (
            "install_dir: /srv/src/\nsource: {kind: directory, path: /srv/src}\n",
            "install_dir: /srv/src is the emulator source's directory",
        ),
        ("install_dir: /usr/bin\n", "install_dir: /usr/bin is the emulator source's directory"),
    ],
)
def test_paths_of_binfmtds_own_that_collide_are_refused(body: str, message: str) -> None:
    """binfmtd's own files (state, lock, socket) each a file of their own, outside the install
    directory, binfmt_misc and the source: a clash is refused at load, naming both keys.
    Before, each was accepted: a state_file named like an emulator in install_dir overwrote
    that emulator (then "register failed: EACCES ... must run as root" every pass), a
    lock_file on an installed emulator made the next start a traceback, install_dir: /usr/bin
    put binfmtd's files among the package's."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.parse(body, "x.yaml")
