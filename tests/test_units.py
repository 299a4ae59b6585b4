"""The shipped systemd units and reference configuration are what the README promises."""

from __future__ import annotations

import configparser
import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest

from binfmtd import config

REPO = Path(__file__).resolve().parent.parent
SYSTEMD = REPO / "systemd"
REAL_EXEC = "ExecStart=/opt/binfmtd/venv/bin/binfmtd"


def units_copy(tmp_path: Path) -> Path:
    """The units and the drop-in in `tmp_path`, the venv's binaries swapped for /bin/true."""
    shutil.copy(SYSTEMD / "binfmtd.socket", tmp_path)
    service = (SYSTEMD / "binfmtd.service").read_text(encoding="utf-8")
    assert REAL_EXEC in service
    service = service.replace(REAL_EXEC, "ExecStart=/bin/true")
    service = service.replace("/opt/binfmtd/venv/bin/binfmtctl", "/bin/true")
    (tmp_path / "binfmtd.service").write_text(service, encoding="utf-8")
    shutil.copytree(SYSTEMD / "binfmtd.service.d", tmp_path / "binfmtd.service.d")
    return tmp_path


def analyze(directory: Path, *units: str) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` on units in `directory` (drop-ins next to them are read)."""
    return subprocess.run(
        ["systemd-analyze", "verify", *(f"./{u}" for u in units)],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def service_section(path: Path) -> dict[str, list[str]]:
    """[Service] key -> every value given (systemd keys repeat), from a unit file."""
    values: dict[str, list[str]] = {}
    section = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """binfmtd.socket and binfmtd.service (with the buildkit drop-in) verify without a warning."""
    units = units_copy(tmp_path)
    done = analyze(units, "binfmtd.socket", "binfmtd.service")
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_drop_in_is_really_read_by_the_verification(tmp_path: Path) -> None:
    """A bad key in a copy of buildkit.conf is reported, so the clean run above checked it."""
    units = units_copy(tmp_path)
    dropin = units / "binfmtd.service.d" / "buildkit.conf"
    dropin.write_text(dropin.read_text(encoding="utf-8") + "NotAKey=1\n", encoding="utf-8")
    done = analyze(units, "binfmtd.service")
    assert "buildkit.conf" in done.stderr
    assert "Unknown key 'NotAKey'" in done.stderr


def test_service_is_notify_with_watchdog_and_restart_policy() -> None:
    """Type=notify, a watchdog, Restart=on-failure, and no restart on exit 78 (bad config)."""
    service = service_section(SYSTEMD / "binfmtd.service")
    assert service["Type"] == ["notify"]
    assert service["WatchdogSec"] and service["WatchdogSec"][-1] not in {"", "0"}
    assert service["Restart"] == ["on-failure"]
    prevented = " ".join(service["RestartPreventExitStatus"]).split()
    assert "78" in prevented
    assert "71" in prevented  # another binfmtd holds the lock: restarting cannot help
    # The reload waits for the daemon's verdict: a refused config fails `systemctl reload`.
    (reload,) = service["ExecReload"]
    assert reload.split()[1:] == ["--socket", config.ApiConfig().socket, "reload"]
    assert reload.split()[0].endswith("/binfmtctl")


def test_service_starts_after_the_boot_time_binfmt_tools() -> None:
    """Ordered after systemd-binfmt and binfmt-support, so a reboot ends like the install."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(SYSTEMD / "binfmtd.service", encoding="utf-8")
    after = parser["Unit"]["After"].split()
    assert {"systemd-binfmt.service", "binfmt-support.service"} <= set(after)


def test_socket_unit_matches_the_daemon_default() -> None:
    """The socket unit listens where the daemon and binfmtctl look by default, 0660."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(SYSTEMD / "binfmtd.socket", encoding="utf-8")
    assert parser["Socket"]["ListenStream"] == config.ApiConfig().socket
    assert parser["Socket"]["SocketMode"] == "0660"
    assert parser["Socket"]["SocketGroup"] == config.ApiConfig().group


def test_reference_config_loads_and_equals_the_defaults() -> None:
    """configs/binfmtd.yaml documents every option at its default: it loads to Config()."""
    path = REPO / "configs" / "binfmtd.yaml"
    loaded = config.load(str(path))
    assert loaded.config_file == str(path)
    assert dataclasses.replace(loaded, config_file=config.Config().config_file) == config.Config()


@pytest.mark.parametrize(
    "section", [f.name for f in dataclasses.fields(config.Config) if f.name != "config_file"]
)
def test_reference_config_mentions_every_option(section: str) -> None:
    """Every top-level option appears in the reference file (documented, not just defaulted)."""
    text = (REPO / "configs" / "binfmtd.yaml").read_text(encoding="utf-8")
    assert f"\n{section}:" in text
