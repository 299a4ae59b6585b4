"""Run a command under a seccomp filter that kills every non-x86_64 system call with SIGSYS.

What systemd's SystemCallArchitectures=native does to binfmtd's unit on an x86_64 host: an
i386 program loads and starts, then dies with SIGSYS at its first system call. Stdlib only.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys

AUDIT_ARCH_X86_64 = 0xC000003E
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ALLOW = 0x80000000, 0x7FFF0000
LD_ARCH, JEQ, RET = 0x20, 0x15, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_RET|K


def install() -> None:
    """Load the filter into this process (inherited by everything it executes)."""
    program = [
        (LD_ARCH, 0, 0, 4),  # seccomp_data.arch
        (JEQ, 1, 0, AUDIT_ARCH_X86_64),
        (RET, 0, 0, SECCOMP_RET_KILL_PROCESS),
        (RET, 0, 0, SECCOMP_RET_ALLOW),
    ]
    code = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buf = ctypes.create_string_buffer(code)
    prog = struct.pack("HxxxxxxP", len(program), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    fprog = ctypes.create_string_buffer(prog)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


if __name__ == "__main__":
    install()
    os.execv(sys.argv[1], sys.argv[1:])
