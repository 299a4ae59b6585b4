"""Event-driven reconcile: inotify on what binfmtd keeps true, and when the next pass may run.

binfmt_misc reports its changes to inotify: a write to `register` is IN_MODIFY on `register`, a
write to an entry (disable, enable, remove) IN_MODIFY on the entry plus IN_DELETE on removal, a
flush IN_DELETE for every entry, and an unmount ends the watch (IN_UNMOUNT, IN_IGNORED). The
install directory and the emulator source report files created, replaced, changed or removed.

`Watcher` (I/O, inotify-simple) waits for any of those, for a wake-up from another thread or a
signal handler (`Waker`), or for a deadline, whichever comes first; bursts are drained as one.
`Pacer` (pure) decides which arches binfmtd has to stop repairing for a while: an entry restored
again and again within seconds means another tool is rewriting it, and a fight at full speed
helps nobody (backoff, and a conflict in status).
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inotify_simple import INotify

SETTLE_S = 0.002  # after the first event, how long to let the rest of a burst arrive
SETTLE_MAX_S = 0.02  # a steady stream of events still gets a pass this often


class Kind(StrEnum):
    """What a watch covers."""

    BINFMT = "binfmt_misc"
    INSTALL = "install_dir"
    SOURCE = "source"


@functools.cache
def _masks() -> tuple[dict[Kind, int], int]:
    """The watch mask of each Kind, and the events that mean a watched directory went.
    inotify-simple (and ctypes) load here, with the daemon's first Watcher after READY=1."""
    from inotify_simple import flags

    gone = flags.DELETE_SELF | flags.MOVE_SELF | flags.UNMOUNT | flags.IGNORED
    # A directory's files appearing, going, renamed or rewritten, and the directory itself going.
    changes = (
        flags.CREATE
        | flags.DELETE
        | flags.ATTRIB
        | flags.CLOSE_WRITE
        | flags.MOVED_FROM
        | flags.MOVED_TO
        | flags.DELETE_SELF
        | flags.MOVE_SELF
        | flags.ONLYDIR
    )
    masks = {
        Kind.BINFMT: flags.MODIFY | flags.CREATE | flags.DELETE | flags.ATTRIB | flags.ONLYDIR,
        Kind.INSTALL: changes | flags.MODIFY,
        Kind.SOURCE: changes,
    }
    return masks, gone


@dataclass(frozen=True)
class Target:
    """A directory to watch; events on children are kept when `wants(name)` says so."""

    kind: Kind
    path: str
    prefix: str = ""  # only children whose name starts with it ("" = all)
    exact: str = ""  # only the child with this name ("" = any that matches `prefix`)

    def wants(self, name: str) -> bool:
        """Whether an event on child `name` (or "" for the directory itself) matters."""
        if not name:
            return True
        return name == self.exact if self.exact else name.startswith(self.prefix)


def targets(binfmt_misc: str, install_dir: str, source: Any = None) -> list[Target]:
    """What the daemon watches: the binfmt_misc mount, the install directory and, when known,
    the source (a directory's qemu-* files, or the pinned .deb)."""
    out = [Target(Kind.BINFMT, binfmt_misc), Target(Kind.INSTALL, install_dir)]
    path = getattr(source, "path", None)
    if isinstance(path, str) and path:
        if os.path.isdir(path):
            out.append(Target(Kind.SOURCE, path, prefix="qemu-"))
        else:
            out.append(Target(Kind.SOURCE, os.path.dirname(path), exact=os.path.basename(path)))
    return out


@dataclass(frozen=True)
class Change:
    """Why a wait ended. Empty (falsy) when only the deadline passed or another thread woke us.

    `overflow`: the kernel dropped events (IN_Q_OVERFLOW): only a full pass is safe.
    `lost`: watches that ended (unmount, directory removed): re-watch after the next pass.
    """

    kinds: frozenset[Kind] = frozenset()
    overflow: bool = False
    lost: frozenset[Kind] = frozenset()
    events: int = 0

    def __bool__(self) -> bool:
        return bool(self.kinds or self.overflow or self.lost)

    @property
    def reason(self) -> str:
        """For the log: overflow, lost:<kind>, or the kinds that changed."""
        if self.overflow:
            return "overflow"
        if self.lost:
            return ",".join(sorted(f"lost:{k}" for k in self.lost))
        return ",".join(sorted(self.kinds))


class Waker:
    """threading.Event's set/clear/wait over an eventfd, so one poll(2) waits for inotify and
    for wake-ups alike. `set` is safe from any thread and from a signal handler."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def set(self) -> None:
        """Wake whoever waits (now or at its next wait)."""
        with contextlib.suppress(BlockingIOError):  # the counter is full: already set
            os.eventfd_write(self.fd, 1)

    def clear(self) -> None:
        """Forget earlier wake-ups."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fd)

    def is_set(self) -> bool:
        """Whether a wake-up is pending."""
        return bool(select.select([self.fd], [], [], 0)[0])

    def wait(self, timeout: float | None = None) -> bool:
        """Block until set or `timeout` s; whether it is set."""
        return bool(select.select([self.fd], [], [], timeout)[0])

    def close(self) -> None:
        """Release the eventfd."""
        os.close(self.fd)


class Watcher:
    """inotify watches on `targets`, re-added when they end; `wait` returns the next Change."""

    def __init__(self, waker: Waker, clock: Callable[[], float] = time.monotonic) -> None:
        self.waker = waker
        self.clock = clock
        self.error: str | None = None
        self._targets: list[Target] = []
        self._wds: dict[int, Target] = {}
        self._ids: dict[Target, tuple[int, int]] = {}
        from inotify_simple import INotify

        try:
            self._ino: INotify | None = INotify(nonblocking=True)
        except OSError as exc:  # ENOSYS, EMFILE (fs.inotify.max_user_instances)
            self._ino = None
            self.error = f"inotify unavailable: {exc.strerror}"
        self._carried = Change()  # read by `changed` during a pass, for the next `wait`
        self._poll = select.poll()
        self._poll.register(waker.fd, select.POLLIN)
        self._events = select.poll()  # inotify alone, for `changed`
        if self._ino is not None:
            self._poll.register(self._ino.fileno(), select.POLLIN)
            self._events.register(self._ino.fileno(), select.POLLIN)

    @property
    def active(self) -> bool:
        """Whether events are being delivered (else the caller has to poll)."""
        return self._ino is not None

    def watch(self, wanted: Iterable[Target]) -> bool:
        """Watch exactly `wanted`; True when a watch was (re)added, so a pass must follow."""
        wanted = list(wanted)
        for wd, target in list(self._wds.items()):
            if target not in wanted:
                self._drop(wd)
        self._targets = wanted
        return self.refresh()

    def refresh(self) -> bool:
        """(Re)add every watch that is missing or covers another directory than the path now
        names (a new mount on top, a directory made again); True when one was added."""
        if self._ino is None:
            return False
        added = False
        for target in self._targets:
            ident = _dir_id(target.path)
            if ident is not None and self._ids.get(target) == ident:
                continue
            for wd in [w for w, t in self._wds.items() if t == target]:
                self._drop(wd)
            self._ids.pop(target, None)
            if ident is None:
                continue  # not there (yet): the pass that makes it triggers a refresh
            try:
                wd = self._ino.add_watch(target.path, _masks()[0][target.kind])
            except OSError:
                continue
            self._wds[wd] = target
            self._ids[target] = ident
            added = True
        return added

    def changed(self) -> bool:
        """Whether a watched thing changed since the last `wait` (events read now, without
        blocking: one poll(2) when there are none). What is read is kept, and the next `wait`
        returns it at once: the pass it calls for still runs."""
        if self._ino is None or not self._events.poll(0):
            return False
        more = self._drain()
        self._carried = _merge(self._carried, more)
        return bool(more)

    def wait(self, timeout: float) -> Change:
        """Block until events, a wake-up or `timeout` s; drain a burst of events as one."""
        carried, self._carried = self._carried, Change()
        ready = self._poll.poll(0 if carried else max(0, round(timeout * 1000)))
        if not ready:
            return carried
        change = _merge(carried, self._drain())
        if change:  # the rest of a burst (a flush writes one event per entry) joins this pass
            deadline = self.clock() + SETTLE_MAX_S
            while self.clock() < deadline and self._poll.poll(round(SETTLE_S * 1000)):
                more = self._drain()
                change = _merge(change, more)
                if not more.events:
                    break
        return change

    def _drain(self) -> Change:
        from inotify_simple import flags

        if self._ino is None:
            return Change()
        gone = _masks()[1]
        kinds: set[Kind] = set()
        lost: set[Kind] = set()
        overflow = False
        count = 0
        for event in self._ino.read(timeout=0):
            count += 1
            if event.mask & flags.Q_OVERFLOW:
                overflow = True
                continue
            target = self._wds.get(event.wd)
            if target is None:
                continue
            if event.mask & gone and not event.name:
                lost.add(target.kind)
                if event.mask & flags.IGNORED:  # the kernel removed the watch
                    self._wds.pop(event.wd, None)
                    self._ids.pop(target, None)
            elif target.wants(event.name):
                kinds.add(target.kind)
        return Change(frozenset(kinds), overflow, frozenset(lost), count)

    def _drop(self, wd: int) -> None:
        target = self._wds.pop(wd)
        self._ids.pop(target, None)
        if self._ino is not None:
            with contextlib.suppress(OSError):
                self._ino.rm_watch(wd)

    def close(self) -> None:
        """Release the inotify instance (the waker belongs to the caller)."""
        if self._ino is not None:
            self._ino.close()
            self._ino = None


def _dir_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _merge(a: Change, b: Change) -> Change:
    return Change(a.kinds | b.kinds, a.overflow or b.overflow, a.lost | b.lost, a.events + b.events)


# ---------------------------------------------------------------- backoff from a fight (pure)


@dataclass
class _Fight:
    repairs: deque[float] = field(default_factory=deque)
    backoff_s: float = 0.0
    until: float = 0.0


@dataclass
class Pacer:
    """Which arches to leave alone for now, because restoring them again is a fight.

    An arch whose entry binfmtd had to restore `limit` times within `window_s` is held: no
    repair until `until`, first for `initial_s`, doubling while the fight goes on, at most
    `max_s`. A quiet `window_s` ends the fight. Times are monotonic seconds.
    """

    limit: int = 10  # a tool in a loop rewrites many times a second; drift tests and
    window_s: float = 2.0  # benchmarks (a flush every 0.5 s) must not count as a fight
    initial_s: float = 1.0
    max_s: float = 60.0
    fights: dict[str, _Fight] = field(default_factory=dict)

    def repaired(self, arches: Iterable[str], now: float) -> list[str]:
        """Record one pass's repairs; returns the arches this starts (or extends) a hold for."""
        self._forget_quiet(now)
        started = []
        for arch in set(arches):
            fight = self.fights.setdefault(arch, _Fight())
            fight.repairs.append(now)
            while fight.repairs and fight.repairs[0] < now - self.window_s:
                fight.repairs.popleft()
            if len(fight.repairs) >= self.limit:
                fight.backoff_s = min(self.max_s, max(self.initial_s, fight.backoff_s * 2))
                fight.until = now + fight.backoff_s
                fight.repairs.clear()
                started.append(arch)
        return sorted(started)

    def held(self, now: float) -> dict[str, str]:
        """{arch: why} for every arch whose repairs are on hold at `now`."""
        return {
            arch: (
                f"another tool keeps rewriting this entry (restored {self.limit} times within "
                f"{self.window_s:g} s); binfmtd backs off {fight.backoff_s:g} s before "
                "restoring it again"
            )
            for arch, fight in sorted(self.fights.items())
            if fight.until > now
        }

    def next_release(self, now: float) -> float | None:
        """When the earliest hold ends (a pass is due then), or None."""
        ends = [f.until for f in self.fights.values() if f.until > now]
        return min(ends) if ends else None

    def _forget_quiet(self, now: float) -> None:
        for arch in [
            a
            for a, f in self.fights.items()
            if f.until <= now - self.window_s
            and (not f.repairs or f.repairs[-1] < now - self.window_s)
        ]:
            del self.fights[arch]
