"""When to try a failing install again: exponential, capped, reset when the source changes.

Pure: a frozen value per arch and two functions. The engine asks `due` before installing and
records each failure with `failed`; a success forgets the value. "The source changed" is a
different fingerprint (a stat identity of the .deb or of the source file), so fixing or
replacing the source retries at once, while an unchanged broken one is not read again (a 60 MB
.deb is not decompressed every tick).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """The failures of one arch's install since its source last changed.

    `retry_at` is a time from the engine's clock (seconds), `delay_s` the wait that led to it,
    `error` the last message.
    """

    failures: int
    retry_at: float
    delay_s: float
    source_id: str
    error: str


def failed(
    previous: Backoff | None,
    now: float,
    source_id: str,
    error: str,
    initial: float,
    cap: float,
    *,
    until_change: bool = False,
) -> Backoff:
    """The state after an install failed at `now`: the wait doubles up to `cap` seconds.

    The count restarts at one when the source is not the one that failed before.
    `until_change`: the failure is a fact about this source (it lacks the arch), so only a
    change of the source ends the wait (delay_s is infinite).
    """
    same = previous is not None and previous.source_id == source_id
    failures = previous.failures + 1 if previous is not None and same else 1
    delay = math.inf if until_change else min(cap, initial * 2.0 ** min(failures - 1, 60))
    return Backoff(failures, now + delay, delay, source_id, error)


def due(state: Backoff | None, now: float, source_id: str) -> bool:
    """Whether to try installing now: never failed, the source changed, or the wait is over."""
    return state is None or state.source_id != source_id or now >= state.retry_at
