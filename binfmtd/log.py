"""structlog, configured once: a human console on a TTY, JSON lines otherwise (for journald).

Events are past-tense snake_case names with stable keys (`arch`, `error`, `interpreter`,
`flags`, `errno`, `duration_ms`); a recurring failure goes through `Repeats`, so it is logged
when it starts, changes and ends, not on every pass.

`configure(..., lazy=True)` (binfmtd --oneshot and the daemon) leaves structlog unimported (its
import pulls in asyncio: ~30 ms, ~3 MB) until the first event at an enabled level; a run that
only succeeds logs nothing at `warning` and never imports it. Modules that log from import time
on take a `lazy` logger for the same reason.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from binfmtd.config import LogFormat


class _Setup:
    """The process's logging configuration: the minimum level, and the structlog set-up still
    to run (None once done, or before `configure`)."""

    level = logging.NOTSET
    pending: Callable[[], None] | None = None
    lock = threading.Lock()  # held while structlog is set up: no thread logs before it is


def configure(
    level: str = "info",
    fmt: LogFormat = LogFormat.AUTO,
    stream: TextIO | None = None,
    *,
    lazy: bool = False,
) -> None:
    """Set up structlog for the whole process; with `lazy`, only when the first event at an
    enabled level is logged (or `get` is called after structlog was imported by others)."""
    out = stream or sys.stderr
    _Setup.level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    _Setup.pending = lambda: _configure_structlog(_Setup.level, fmt, out)
    if not lazy or "structlog" in sys.modules:
        _flush()


def reset() -> None:
    """Forget the configuration: structlog's defaults again, nothing pending (for tests)."""
    _Setup.level, _Setup.pending = logging.NOTSET, None
    if "structlog" in sys.modules:
        sys.modules["structlog"].reset_defaults()


def _flush() -> None:
    """Run the pending structlog set-up, if any; another thread waits until it is done (the
    first events of --oneshot come from several install threads at once)."""
    with _Setup.lock:
        if _Setup.pending is not None:
            _Setup.pending()
            _Setup.pending = None


def _configure_structlog(level: int, fmt: LogFormat, out: TextIO) -> None:
    import structlog

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
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )


def get(name: str = "binfmtd") -> Any:
    """A bound logger tagged with the component name (a `Deferred` one while structlog is
    not set up yet: see `configure(lazy=True)`)."""
    component = name.rsplit(".", 1)[-1]
    if _Setup.pending is not None and "structlog" not in sys.modules:
        return Deferred(name, {"component": component})
    _flush()
    import structlog

    return structlog.get_logger(name).bind(component=component)


def lazy(name: str) -> Deferred:
    """A logger for module level: structlog is imported (and set up) only by its first event
    at an enabled level, whether or not `configure` ran before this call."""
    return Deferred(name, {"component": name.rsplit(".", 1)[-1]})


class Deferred:
    """A logger with structlog's filtering-logger methods that imports and sets up structlog
    on its first event at an enabled level, then hands every event to a real one."""

    def __init__(self, name: str, context: dict[str, Any]) -> None:
        self._name, self._context = name, context
        self._real: Any = None

    def bind(self, **fields: Any) -> Deferred:
        """A logger with more context, as structlog's `bind`."""
        return Deferred(self._name, {**self._context, **fields})

    def is_enabled_for(self, level: int) -> bool:
        """Whether events at `level` (a `logging` number) are emitted."""
        return level >= _Setup.level

    def _emit(self, method: str, level: int, event: str, fields: dict[str, Any]) -> None:
        if level < _Setup.level:
            return
        if self._real is None:
            _flush()
            import structlog

            self._real = structlog.get_logger(self._name).bind(**self._context)
        getattr(self._real, method)(event, **fields)

    def debug(self, event: str, **fields: Any) -> None:
        """Log `event` at debug."""
        self._emit("debug", logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        """Log `event` at info."""
        self._emit("info", logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        """Log `event` at warning."""
        self._emit("warning", logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        """Log `event` at error."""
        self._emit("error", logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """Log `event` at error with the current exception's traceback."""
        self._emit("exception", logging.ERROR, event, fields)

    def critical(self, event: str, **fields: Any) -> None:
        """Log `event` at critical."""
        self._emit("critical", logging.CRITICAL, event, fields)


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
