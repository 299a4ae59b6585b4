"""Multi-platform builds through a REAL buildkitd hosted by `binfmtd --sandbox`.

Needs BuildKit's `buildkitd` and `buildctl` (on PATH, or named by BINFMTD_BUILDKITD and
BINFMTD_BUILDCTL) and Debian's runc; without them every test here is skipped, saying how to get
them (DEVELOPERS.md). Everything runs in the sandbox's private binfmt_misc; the host is untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import daemonutil as du
import pytest
from conftest import Cache, write_config

from binfmtd.buildkit import WorkerUnreachable, list_workers, solve_definition
from binfmtd.llb import probe_definition
from binfmtd.probe import probe_path

HOW_TO_GET = (
    "no real BuildKit: put buildkitd and buildctl on PATH or set BINFMTD_BUILDKITD and "
    "BINFMTD_BUILDCTL (release archives: https://github.com/moby/buildkit/releases; "
    "see DEVELOPERS.md), and install runc (apt-get install runc)"
)
SEARCH = f"{os.environ.get('PATH', '')}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"


def _tool(name: str) -> str | None:
    given = os.environ.get(f"BINFMTD_{name.upper()}")
    return given if given else shutil.which(name, path=SEARCH)


BUILDKITD, BUILDCTL, RUNC = _tool("buildkitd"), _tool("buildctl"), _tool("runc")
pytestmark = pytest.mark.skipif(not (BUILDKITD and BUILDCTL and RUNC), reason=HOW_TO_GET)

ARCHES = ["aarch64", "s390x", "arm", "mips64", "mips64el"]
# TARGETARCH -> the Debian architecture whose busybox-static serves it.
DEBIAN_ARCH = {"amd64": "amd64", "arm64": "arm64", "s390x": "s390x", "arm": "armhf", "386": "i386"}
FIVE = ("linux/amd64", "linux/arm64", "linux/s390x", "linux/arm/v7", "linux/386")
UNAME = {
    "linux/amd64": {"x86_64"},
    "linux/arm64": {"aarch64"},
    "linux/s390x": {"s390x"},
    "linux/arm/v7": {"armv7l"},
    "linux/386": {"i686", "x86_64"},  # a 32-bit x86 binary runs natively; uname says the kernel's
}
DOCKERFILE = """FROM scratch
ARG TARGETARCH
COPY ${TARGETARCH}/busybox /bin/busybox
COPY ${TARGETARCH}/busybox /bin/sh
RUN busybox uname -m > /arch
"""


def build_context(cache: Cache, into: Path) -> Path:
    """The 5-platform Dockerfile and one Debian busybox-static per TARGETARCH."""
    into.mkdir(parents=True, exist_ok=True)
    for target, debian in DEBIAN_ARCH.items():
        (into / target).mkdir(exist_ok=True)
        shutil.copy(cache.busybox(debian), into / target / "busybox")
    (into / "Dockerfile").write_text(DOCKERFILE, encoding="utf-8")
    return into


def buildctl(kit: str, context: Path, platforms: tuple[str, ...], out: Path) -> Any:
    """`buildctl build --no-cache` of the context's Dockerfile for `platforms` into `out`.

    No cache: a cached RUN step would "build" for a platform the worker can no longer run.
    """
    argv = [str(BUILDCTL), "--addr", f"unix://{kit}", "build", "--no-cache"]
    argv += ["--frontend", "dockerfile.v0"]
    argv += ["--local", f"context={context}", "--local", f"dockerfile={context}"]
    argv += ["--opt", f"platform={','.join(platforms)}", "--output", f"type=local,dest={out}"]
    return du.run(argv, 300)


def built_arch(out: Path, platform: str, many: bool) -> str:
    """The /arch a build wrote for `platform` (local export: one directory per platform)."""
    where = out / platform.replace("/", "_") if many else out
    return (where / "arch").read_text(encoding="utf-8").strip()


class Hosted:
    """A --sandbox daemon hosting the real buildkitd; `worker()` reads /v1/worker."""

    def __init__(self, daemon: du.Daemon, kit: str) -> None:
        self.daemon, self.kit = daemon, kit

    def worker(self) -> dict[str, Any]:
        return dict(json.loads(self.daemon.ctl("worker", "--json").stdout))

    def served(self) -> set[str]:
        records = list_workers(self.kit, timeout=5.0)
        return set(records[0].platforms) if records else set()

    def settled(self, check: Callable[[dict[str, Any]], bool] = lambda w: True) -> Any:
        """Wait until the worker runs with no proof pending or running, and `check` holds."""

        def done() -> dict[str, Any] | None:
            w = self.worker()
            busy = any(r["proof"] in ("pending", "proving") for r in w["platforms"])
            ok = w["state"] == "running" and w["platforms"] and not busy and check(w)
            return w if ok else None

        return du.wait_until("the worker settled", done, 180, every=0.2, tolerate=TOLERATE)


TOLERATE = (*du.TRANSIENT, WorkerUnreachable, TypeError)


def _start(tmp: Path, *, outer: bool, **kit_keys: str) -> tuple[du.Daemon, str]:
    tmp.mkdir(exist_ok=True)
    short = du.sock_dir()
    kit = f"{short}/kit.sock"
    cfg = write_config(
        tmp,
        arches=ARCHES,
        reconcile_interval_s=0.5,
        lock_file=f"{short}/lock",
        api={"socket": f"{short}/api.sock", "group": None},
        log={"format": "json", "level": "info"},
        buildkit={
            "enabled": True,
            "path": str(BUILDKITD),
            "socket": kit,
            "config_path": f"{short}/buildkitd.toml",
            "state_dir": f"{short}/state",
            "run_dir": f"{short}/run",
            "socket_group": None,
            "debounce_s": 0.5,
            "health_interval_s": 0.5,
            "grace_s": 10.0,
            **kit_keys,
        },
    )
    return du.start(cfg, outer=outer, ready=True, timeout=120), kit


@pytest.fixture(scope="module")
def hosted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosted]:
    """One real worker for the module, hosted by a sandbox started as the host's root."""
    daemon, kit = _start(tmp_path_factory.mktemp("real"), outer=False)
    try:
        yield Hosted(daemon, kit)
    finally:
        daemon.close()
        shutil.rmtree(os.path.dirname(kit), ignore_errors=True)


@pytest.fixture(scope="module")
def context(cache: Cache, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 5-platform build context."""
    return build_context(cache, tmp_path_factory.mktemp("ctx"))


def test_every_offered_platform_ran_a_run_step_through_the_worker(hosted: Hosted) -> None:
    """Each advertised platform is proven by a RUN step; mips64/mips64le too, despite BuildKit."""
    worker = hosted.settled()
    rows = {r["platform"]: r for r in worker["platforms"]}
    assert {r["proof"] for r in rows.values()} == {"proven"}, rows
    assert set(worker["offered_platforms"]) == set(worker["advertised_platforms"])
    assert {"linux/mips64", "linux/mips64le", *FIVE} <= set(worker["offered_platforms"])
    # BuildKit's own check says otherwise for mips64: its test binary, not the platform, fails.
    assert "platform linux/mips64 cannot pass the validation" in hosted.daemon.log_text()
    shown = hosted.daemon.ctl("worker")
    assert shown.returncode == 0, shown.stdout
    assert "docker buildx create --name binfmtd --driver remote unix://" in shown.stdout
    assert "--platform" not in shown.stdout


def test_mips64_disagreement_is_buildkits_test_binary_abi_version(hosted: Hosted) -> None:
    """The same mips64 probe runs with EI_ABIVERSION 0 and fails with 5 (BuildKit's binary)."""
    hosted.settled()
    for arch, platform in (("mips64", "linux/mips64"), ("mips64el", "linux/mips64le")):
        probe = bytearray(Path(str(probe_path(arch))).read_bytes())
        for abi, ok in ((0, True), (5, False)):
            probe[8] = abi  # EI_ABIVERSION
            name = f"abi {abi} {platform}"
            definition = probe_definition(platform, bytes(probe), name)
            outcome = solve_definition(hosted.kit, definition.data, name, 120)
            assert outcome.ok is ok, (platform, abi, outcome)
            if not ok:
                assert "exec format error" in str(outcome.error)


def test_five_platform_dockerfile_builds_with_the_right_arch(
    hosted: Hosted, context: Path, tmp_path: Path
) -> None:
    """FROM scratch + COPY busybox + RUN uname -m, for 5 platforms: every /arch is right."""
    hosted.settled()
    done = buildctl(hosted.kit, context, FIVE, tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    for platform in FIVE:
        assert built_arch(tmp_path / "out", platform, many=True) in UNAME[platform], platform


def test_disable_withdraws_arm64_from_the_worker_and_enable_brings_it_back(
    hosted: Hosted, context: Path, tmp_path: Path
) -> None:
    """disable aarch64: ListWorkers drops linux/arm64 and its build fails; enable: it builds."""
    before = hosted.settled()
    assert hosted.daemon.ctl("disable", "aarch64").returncode == 0
    withdrawn = hosted.settled(lambda w: "linux/arm64" not in w["advertised_platforms"])
    assert "linux/arm64" not in hosted.served()
    failed = buildctl(hosted.kit, context, ("linux/arm64",), tmp_path / "no")
    assert failed.returncode != 0
    assert "exec format error" in failed.stderr
    assert hosted.daemon.ctl("enable", "aarch64").returncode == 0
    hosted.settled(lambda w: "linux/arm64" in w["offered_platforms"])
    assert "linux/arm64" in hosted.served()
    done = buildctl(hosted.kit, context, ("linux/arm64",), tmp_path / "yes")
    assert done.returncode == 0, done.stderr[-3000:]
    assert built_arch(tmp_path / "yes", "linux/arm64", many=False) == "aarch64"
    # buildkitd exits 1 on SIGTERM: the two restarts were normal stops, not failures.
    after = hosted.worker()
    assert after["restarts"] >= withdrawn["restarts"] + 1 >= before["restarts"] + 2
    assert after["failures"] == 0
    assert all(e["state"] != "backoff" for e in hosted.daemon.events("worker_state_changed"))


def test_sandbox_without_the_id_range_refuses_with_buildkits_own_error(
    tmp_path: Path,
) -> None:
    """Only root mapped (no full id range): every platform is refused with runc's devpts error."""
    daemon, kit = _start(tmp_path, outer=True)
    try:

        def all_refused() -> dict[str, Any] | None:
            w = dict(json.loads(daemon.ctl("worker", "--json").stdout))
            rows = w["platforms"]
            refused = rows and all(r["proof"] == "refused" for r in rows)
            return w if refused and w["state"] == "stopped" else None

        worker = du.wait_until("every platform refused, worker down", all_refused, 180, every=0.2)
        reasons = {r["reason"] for r in worker["platforms"]}
        assert all("did not complete successfully" in r for r in reasons), reasons
        assert any("devpts" in r or "invalid argument" in r for r in reasons), reasons
        shown = daemon.ctl("worker")
        assert shown.returncode == 1
        assert "refused" in shown.stdout and "docker buildx create" not in shown.stdout
        print(shown.stdout)
    finally:
        daemon.close()
        shutil.rmtree(os.path.dirname(kit), ignore_errors=True)


def _openssl(*argv: str) -> None:
    done = du.run(["openssl", *argv], 60)
    assert done.returncode == 0, done.stderr


def make_certs(where: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate it signed (EC keys)."""
    where.mkdir(mode=0o700)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca = ["-keyout", f"{where}/ca.key", "-out", f"{where}/ca.pem"]
    _openssl("req", "-x509", *key, *ca, "-subj", "/CN=binfmtd-test-ca", "-days", "1")
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (where / f"{name}.ext").write_text(ext + "\n", encoding="ascii")
        request = ["-keyout", f"{where}/{name}.key", "-out", f"{where}/{name}.csr"]
        _openssl("req", *key, *request, "-subj", f"/CN={name}")
        sign = ["-CA", f"{where}/ca.pem", "-CAkey", f"{where}/ca.key", "-CAcreateserial"]
        extra = ["-days", "1", "-extfile", f"{where}/{name}.ext", "-out", f"{where}/{name}.pem"]
        _openssl("x509", "-req", "-in", f"{where}/{name}.csr", *sign, *extra)
    for path in where.iterdir():
        path.chmod(0o600 if path.suffix == ".key" else 0o644)
    return where


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_remote_node_over_mutual_tls(tmp_path: Path) -> None:
    """A TCP listener that answers buildctl with a client certificate and refuses it without."""
    certs = make_certs(tmp_path / "certs")
    address = f"127.0.0.1:{free_port()}"
    tls = {
        "tcp_address": address,
        "tls_ca": str(certs / "ca.pem"),
        "tls_cert": str(certs / "server.pem"),
        "tls_key": str(certs / "server.key"),
    }
    daemon, kit = _start(tmp_path / "d", outer=False, **tls)
    try:
        hosted = Hosted(daemon, kit)
        worker = hosted.settled()
        line = worker["buildx_append_command"]
        assert line.startswith("docker buildx create --append --name binfmtd --driver remote")
        assert f"--platform {','.join(worker['offered_platforms'])}" in line
        assert line.endswith(f" tcp://{address}")
        ctl = [str(BUILDCTL), "--addr", f"tcp://{address}", "--tlscacert", tls["tls_ca"]]
        client = ["--tlscert", str(certs / "client.pem"), "--tlskey", str(certs / "client.key")]
        done = du.run([*ctl, *client, "debug", "workers", "-v"], 60)
        assert done.returncode == 0, done.stderr
        assert "linux/arm64" in done.stdout
        refused = du.run([*ctl, "debug", "workers"], 60)
        assert refused.returncode != 0
    finally:
        daemon.close()
        shutil.rmtree(os.path.dirname(kit), ignore_errors=True)
