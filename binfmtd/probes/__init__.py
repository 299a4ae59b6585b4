"""Probe executables for the QEMU linux-user targets (package data)."""
