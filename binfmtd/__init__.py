"""binfmtd: keeps QEMU user-mode emulators registered in binfmt_misc, proven by execution."""

__version__ = "0.1.0"
