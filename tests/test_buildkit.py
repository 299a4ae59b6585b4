"""The BuildKit edge: config rendering, platform comparison, and ListWorkers over real gRPC."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from binfmtd.buildkit import (
    WorkerRecord,
    WorkerUnreachable,
    buildx_append_command,
    buildx_command,
    deep_merge,
    list_workers,
    normalize_platform,
    platform_diff,
    render_config,
)

FAKE = Path(__file__).with_name("fake_buildkitd")
VERIFIED = ["linux/amd64", "linux/arm64", "linux/arm/v7", "linux/riscv64"]
USER_BASE: dict[str, Any] = {
    "debug": True,
    "root": "/somewhere/else",
    "insecure-entitlements": ["network.host"],
    "grpc": {"address": ["tcp://0.0.0.0:1234"], "gid": 0},
    "worker": {
        "oci": {"enabled": False, "platforms": ["linux/s390x"], "gc": True, "max-parallelism": 4},
        "containerd": {"namespace": "buildkit"},
    },
    "registry": {"docker.io": {"mirrors": ["mirror.gcr.io"]}},
}


def rendered(base: dict[str, Any], *, containerd: bool = False) -> dict[str, Any]:
    """render_config's output parsed back."""
    text = render_config(base, VERIFIED, containerd=containerd, root="/var/lib/binfmtd/buildkit")
    return tomllib.loads(text)


# --- render_config -----------------------------------------------------------------------------


def test_render_config_platforms_are_exactly_the_verified_set() -> None:
    """The OCI worker is enabled and advertises exactly the verified platforms, in order."""
    config = rendered({})
    assert config["worker"]["oci"] == {"enabled": True, "platforms": VERIFIED}
    assert config["root"] == "/var/lib/binfmtd/buildkit"


def test_render_config_keeps_the_users_other_keys() -> None:
    """Keys of the base toml that we do not own survive the merge untouched."""
    config = rendered(USER_BASE)
    assert config["debug"] is True
    assert config["insecure-entitlements"] == ["network.host"]
    assert config["grpc"] == USER_BASE["grpc"]
    assert config["registry"] == USER_BASE["registry"]
    assert config["worker"]["oci"]["gc"] is True
    assert config["worker"]["oci"]["max-parallelism"] == 4
    assert config["worker"]["containerd"]["namespace"] == "buildkit"


def test_render_config_our_keys_win() -> None:
    """The user's enabled/platforms/root are overridden by ours."""
    config = rendered(USER_BASE)
    assert config["worker"]["oci"]["enabled"] is True
    assert config["worker"]["oci"]["platforms"] == VERIFIED
    assert config["root"] == "/var/lib/binfmtd/buildkit"


@pytest.mark.parametrize("containerd", [True, False])
def test_render_config_containerd_switch(containerd: bool) -> None:
    """The containerd worker is on or off as asked, and never serves other platforms."""
    worker = rendered(USER_BASE, containerd=containerd)["worker"]["containerd"]
    assert worker["enabled"] is containerd
    assert worker["platforms"] == VERIFIED


def test_deep_merge_does_not_mutate_its_inputs() -> None:
    """Merging returns new tables and leaves the base alone."""
    base = {"worker": {"oci": {"gc": True}}}
    merged = deep_merge(base, {"worker": {"oci": {"enabled": True}}})
    assert merged == {"worker": {"oci": {"gc": True, "enabled": True}}}
    assert base == {"worker": {"oci": {"gc": True}}}


PLATFORM = st.builds(
    "/".join,
    st.tuples(
        st.just("linux"),
        st.sampled_from(["amd64", "arm64", "386", "ppc64le", "s390x", "riscv64", "mips64le"]),
    ),
)


@given(st.lists(PLATFORM, unique=True), st.booleans())
def test_render_config_round_trips_any_platform_list(platforms: list[str], debug: bool) -> None:
    """Whatever the verified list, the rendered TOML parses back to exactly that list."""
    text = render_config({"debug": debug}, platforms, containerd=False, root="/r")
    config = tomllib.loads(text)
    assert config["worker"]["oci"]["platforms"] == platforms
    assert config["debug"] is debug


# --- platforms ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_", "normal"),
    [
        ("linux/amd64", "linux/amd64"),
        ("Linux/AMD64", "linux/amd64"),
        ("linux/arm64/v8", "linux/arm64"),
        ("linux/amd64/v1", "linux/amd64"),
        ("linux/amd64/v3", "linux/amd64/v3"),
        ("linux/arm/v7", "linux/arm/v7"),
        ("linux/arm64/", "linux/arm64"),
    ],
)
def test_normalize_platform(given_: str, normal: str) -> None:
    """Platforms compare after containerd-style normalization."""
    assert normalize_platform(given_) == normal


def test_diff_exact_match() -> None:
    """Same sets, in any order and spelling, match."""
    diff = platform_diff(["linux/arm64", "linux/amd64"], ["linux/amd64", "linux/arm64/v8"])
    assert diff.matches
    assert diff.as_dict() == {"missing": [], "extra": [], "buildkit_additions": []}


def test_diff_names_missing_and_extra() -> None:
    """What we intended but is not served is missing; what is served unasked is extra."""
    diff = platform_diff(["linux/amd64", "linux/s390x"], ["linux/amd64", "linux/ppc64le"])
    assert (diff.missing, diff.extra) == (("linux/s390x",), ("linux/ppc64le",))
    assert not diff.matches


def test_diff_names_buildkits_amd64_levels_as_additions() -> None:
    """amd64 v2/v3/v4 that BuildKit adds itself are reported as its additions, not hidden."""
    diff = platform_diff(
        ["linux/amd64"], ["linux/amd64", "linux/amd64/v2", "linux/amd64/v3", "linux/amd64/v4"]
    )
    assert diff.buildkit_additions == ("linux/amd64/v2", "linux/amd64/v3", "linux/amd64/v4")
    assert diff.extra == ()
    assert diff.matches


def test_diff_amd64_levels_without_amd64_are_extra() -> None:
    """Without linux/amd64 intended, an amd64 level is not a known addition but extra."""
    diff = platform_diff(["linux/arm64"], ["linux/arm64", "linux/amd64/v2"])
    assert (diff.extra, diff.buildkit_additions) == (("linux/amd64/v2",), ())


def test_buildx_command_follows_the_worker() -> None:
    """One node: remote driver on the unix:// socket, no --platform (it would pin the list)."""
    line = buildx_command("binfmtd", "/run/binfmtd/buildkitd.sock")
    assert line == (
        "docker buildx create --name binfmtd --driver remote unix:///run/binfmtd/buildkitd.sock"
    )


def test_buildx_command_quotes_for_the_shell() -> None:
    """Odd names are quoted so the line can be pasted into a shell."""
    assert "'my builder'" in buildx_command("my builder", "/s")


def test_buildx_append_command_routes_the_proven_platforms() -> None:
    """A remote node: --append, --platform routing, mutual TLS files, the tcp:// address."""
    line = buildx_append_command("ci", "10.0.0.7:1234", ["linux/arm64", "linux/s390x"])
    assert line.startswith("docker buildx create --append --name ci --driver remote")
    assert "--platform linux/arm64,linux/s390x" in line
    assert "--driver-opt cacert=CA.pem,cert=CLIENT-CERT.pem,key=CLIENT-KEY.pem" in line
    assert line.endswith(" tcp://10.0.0.7:1234")


# --- ListWorkers over real gRPC ----------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path, as Unix socket paths must stay under ~100 bytes."""
    path = Path(tempfile.mkdtemp(prefix="bk", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def wait_for_workers(socket: Path, deadline_s: float = 10.0) -> tuple[WorkerRecord, ...]:
    """Poll ListWorkers until it answers or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return list_workers(str(socket), timeout=1.0)
        except WorkerUnreachable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def served(short_dir: Path) -> Iterator[Path]:
    """The stand-in buildkitd serving VERIFIED on a socket; yields the socket path."""
    config = short_dir / "buildkitd.toml"
    config.write_text(render_config(USER_BASE, VERIFIED, containerd=False, root=str(short_dir)))
    socket = short_dir / "buildkitd.sock"
    argv = [sys.executable, str(FAKE), "--config", str(config), "--addr", f"unix://{socket}"]
    argv += ["--debug", "--oci-worker-snapshotter=native", "--oci-worker-platform", "x"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_workers(socket)
        yield socket
    finally:
        proc.terminate()
        assert proc.wait(60) == 0  # a loaded machine may take a while to run its exit
        assert not socket.exists()


def test_stand_in_serves_exactly_the_toml_platforms(served: Path) -> None:
    """ListWorkers over gRPC returns the TOML's platforms plus BuildKit's amd64 levels."""
    (record,) = list_workers(str(served), timeout=2.0)
    assert record.platforms[: len(VERIFIED)] == tuple(VERIFIED)
    assert set(record.platforms) - set(VERIFIED) == {"linux/amd64/v2", "linux/amd64/v3"}
    assert record.labels["org.mobyproject.buildkit.worker.executor"] == "oci"
    diff = platform_diff(VERIFIED, record.platforms)
    assert diff.matches
    assert diff.buildkit_additions == ("linux/amd64/v2", "linux/amd64/v3")


def test_list_workers_on_a_missing_socket_is_a_readable_error(short_dir: Path) -> None:
    """No server: WorkerUnreachable names the address and the gRPC status."""
    socket = short_dir / "nothing.sock"
    with pytest.raises(WorkerUnreachable) as caught:
        list_workers(str(socket), timeout=1.0)
    assert f"unix://{socket}" in str(caught.value)
    assert "UNAVAILABLE" in str(caught.value)


def test_stand_in_crash_mode_exits_at_once(short_dir: Path) -> None:
    """--fake-mode=crash exits 1 before serving, with a log line on stderr."""
    argv = [sys.executable, str(FAKE), "--addr", f"unix://{short_dir}/s", "--fake-mode=crash"]
    done = subprocess.run(argv, capture_output=True, timeout=30, check=False)
    assert done.returncode == 1
    assert b"level=fatal" in done.stderr
