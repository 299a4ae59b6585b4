"""Preflight: is this host able to run binfmtd at all? One clear line and a distinct exit code."""

from __future__ import annotations

import os
from enum import IntEnum

from binfmtd.kernel import BinfmtMisc, KernelError, mount_type
from binfmtd.ns import kernel_version
from binfmtd.wire import ExitError

MIN_KERNEL = (4, 8)


class Exit(IntEnum):
    """Exit codes, each with one meaning (78 = bad configuration, as systemd expects)."""

    OK = 0
    ARCH_FAILED = 1
    USAGE = 64
    KERNEL_TOO_OLD = 65
    NO_BINFMT_MISC = 66
    MOUNT_FAILED = 67
    BINFMT_DISABLED = 68
    NOT_ROOT = 69
    SANDBOX_UNSUPPORTED = 70
    ALREADY_RUNNING = 71
    SOFTWARE = 72
    CONFIG = 78


class PreflightError(ExitError):
    """A failed check: what is wrong and what to do (`message`), and the exit code (`code`)."""


def check_kernel(release: str | None = None) -> None:
    """The F flag needs Linux >= 4.8."""
    release = release or os.uname().release
    if kernel_version(release) < MIN_KERNEL:
        raise PreflightError(
            Exit.KERNEL_TOO_OLD,
            f"kernel {release} is too old: binfmtd needs Linux >= 4.8 for the binfmt_misc F "
            "(fix-binary) flag; upgrade the kernel",
        )


def check_filesystem(filesystems: str = "/proc/filesystems") -> None:
    """binfmt_misc must be built in or loadable."""
    try:
        with open(filesystems, encoding="ascii") as handle:
            known = {line.split()[-1] for line in handle if line.strip()}
    except OSError:
        known = set()
    if "binfmt_misc" not in known:
        raise PreflightError(
            Exit.NO_BINFMT_MISC,
            "binfmt_misc is not available in this kernel: run `modprobe binfmt_misc` "
            "(CONFIG_BINFMT_MISC)",
        )


def ensure_mounted(kernel: BinfmtMisc) -> bool:
    """Mount binfmt_misc at its path unless it is there; True when we mounted it.

    systemd's proc-sys-fs-binfmt_misc.automount shows autofs at the path: touching `status`
    triggers the real mount, so we look again before mounting ourselves.
    """
    if kernel.is_mounted():
        return False
    if mount_type(kernel.root) == "autofs":
        os.path.exists(kernel.root / "status")
        if kernel.is_mounted():
            return False
    if not kernel.root.is_dir():
        raise PreflightError(
            Exit.MOUNT_FAILED, f"{kernel.root} does not exist: is /proc mounted? (binfmt_misc path)"
        )
    try:
        kernel.mount()
    except KernelError as exc:
        raise PreflightError(
            Exit.MOUNT_FAILED,
            f"binfmt_misc is not mounted at {kernel.root} and mounting it failed: {exc}; "
            "mount it with `mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc`",
        ) from None
    return True


def check_enabled(kernel: BinfmtMisc) -> None:
    """A disabled instance runs nothing; turning it back on is the operator's decision."""
    if not kernel.status_enabled():
        raise PreflightError(
            Exit.BINFMT_DISABLED,
            f"binfmt_misc at {kernel.root} is disabled (status: disabled); enable it with "
            f"`echo 1 > {kernel.root}/status`",
        )


def check_root() -> None:
    """Registering entries needs root (in the current user namespace)."""
    if os.geteuid() != 0:
        raise PreflightError(
            Exit.NOT_ROOT,
            "binfmtd must run as root (or use --sandbox as root in a new user namespace)",
        )


def run_all(kernel: BinfmtMisc) -> bool:
    """Every check in order; True when binfmtd mounted binfmt_misc itself."""
    check_kernel()
    check_root()
    check_filesystem()
    mounted = ensure_mounted(kernel)
    check_enabled(kernel)
    return mounted
