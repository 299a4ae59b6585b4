"""structlog, configured once: a human console on a TTY, JSON lines otherwise (for journald).

Events are past-tense snake_case names with stable keys (`arch`, `error`, `interpreter`,
`flags`, `errno`, `duration_ms`); a recurring failure goes through `Repeats`, so it is logged
when it starts, changes and ends, not on every pass.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import structlog

from binfmtd.config import LogFormat


def configure(
    level: str = "info", fmt: LogFormat = LogFormat.AUTO, stream: TextIO | None = None
) -> None:
    """Set up structlog for the whole process."""
    out = stream or sys.stderr
    use_console = fmt is LogFormat.CONSOLE or (fmt is LogFormat.AUTO and out.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if use_console
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )


def get(name: str = "binfmtd") -> Any:
    """A bound logger tagged with the component name."""
    return structlog.get_logger(name).bind(component=name.rsplit(".", 1)[-1])


class Repeats:
    """One log line per change of a recurring condition, not one per occurrence.

    A failure that recurs every pass (an emulator source that is missing, a probe that keeps
    failing) is logged when it starts (`repeat="started"`), when its message changes
    (`repeat="changed"`, with the `count` of the previous one) and when it ends (the `ended`
    event at info, with `count` and `duration_s`); identical repeats in between are only
    counted. Keys of every line: the `key` field (e.g. `arch`), `error`, `repeat`, `count`.
    """

    def __init__(
        self,
        logger: Any,
        event: str,
        ended: str,
        key: str = "arch",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log, self._event, self._ended, self._key, self._clock = (
            logger,
            event,
            ended,
            key,
            clock,
        )
        self._open: dict[str, tuple[str, int, float]] = {}

    def seen(self, key: str, error: str, **fields: Any) -> bool:
        """`key` failed with `error` again; logs (and returns True) only on a start or change."""
        previous = self._open.get(key)
        if previous is not None and previous[0] == error:
            self._open[key] = (error, previous[1] + 1, previous[2])
            return False
        repeat = "started" if previous is None else "changed"
        count = 0 if previous is None else previous[1]
        self._log.warning(
            self._event, **{self._key: key}, error=error, repeat=repeat, count=count, **fields
        )
        self._open[key] = (error, 1, self._clock())
        return True

    def __len__(self) -> int:
        """How many keys are failing now."""
        return len(self._open)

    def cleared(self, key: str, **fields: Any) -> bool:
        """`key` is fine again; logs the end (and returns True) if it was failing."""
        previous = self._open.pop(key, None)
        if previous is None:
            return False
        error, count, since = previous
        duration = round(self._clock() - since, 3)
        self._log.info(
            self._ended, **{self._key: key}, error=error, count=count, duration_s=duration, **fields
        )
        return True

    def update(self, current: Mapping[str, str]) -> bool:
        """The whole set of failing keys now: `seen` for each, `cleared` for the rest."""
        changed = False
        for key, error in current.items():
            changed = self.seen(key, error) or changed
        for key in [k for k in self._open if k not in current]:
            changed = self.cleared(key) or changed
        return changed

    @property
    def failing(self) -> dict[str, str]:
        """The keys failing now, with their last error."""
        return {key: value[0] for key, value in self._open.items()}
