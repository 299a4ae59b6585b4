"""Pure modules stay pure by import: loading one never loads subprocess, socket or yaml."""

from __future__ import annotations

import subprocess
import sys

import pytest

PURE = [
    "binfmtd.arch",
    "binfmtd.binfmt",
    "binfmtd.elf",
    "binfmtd.truth",
    "binfmtd.status",
    "binfmtd.plan",
]
FORBIDDEN = ["subprocess", "socket", "yaml"]


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io(module: str) -> None:
    """A fresh interpreter imports `module` and finds none of subprocess, socket, yaml loaded."""
    code = f"import sys, {module}; print(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"{module} loaded {done.stdout.strip()}"
