"""sd_notify for Type=notify: READY, STATUS, WATCHDOG, RELOADING, STOPPING (via sdnotify).

Without NOTIFY_SOCKET every call is a no-op, so the daemon runs the same outside systemd.
"""

from __future__ import annotations

import os
import time
from typing import Any


class Notifier:
    """Sends state changes to systemd; pings the watchdog at half its period."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._sd: Any = None  # made by the first message (the daemon preloads sdnotify)
        self.watchdog_s = _watchdog_period()
        self._last_ping = 0.0

    def _send(self, text: str) -> None:
        if not self.enabled:
            return
        if self._sd is None:
            import sdnotify

            self._sd = sdnotify.SystemdNotifier()
        self._sd.notify(text)

    def ready(self, status: str) -> None:
        """READY=1 with a one-line STATUS."""
        self._send(f"READY=1\nSTATUS={_one_line(status)}")

    def status(self, status: str) -> None:
        """Keep STATUS= current."""
        self._send(f"STATUS={_one_line(status)}")

    def reloading(self) -> None:
        """RELOADING=1 (with MONOTONIC_USEC, as systemd >= 253 wants for Type=notify-reload)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """STOPPING=1."""
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        """WATCHDOG=1 when WatchdogSec is set and half the period has passed."""
        if self.watchdog_s is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_s / 2:
            self._last_ping = now
            self._send("WATCHDOG=1")


def _watchdog_period() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1_000_000
    except ValueError:
        return None


def _one_line(text: str) -> str:
    return " ".join(text.split())[:400]
