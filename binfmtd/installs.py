"""A pass's emulator installs, run in parallel and handed back one batch at a time.

The engine registers and probes an arch as soon as its emulator is installed, while others are
still being read and hashed. `install` runs the source's streams on worker threads (a .deb is one
pass over its tar, on one thread; a directory's files on `workers` threads) and calls back on
the calling thread with each batch of outcomes. Workers only read the source and write the
install directory; the caller changes the engine's state.
"""

from __future__ import annotations

import lzma
import queue
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from binfmtd import emulators
from binfmtd.config import SourceKind
from binfmtd.emulators import Installed, InstallError
from binfmtd.run import usable_cpus
from binfmtd.sources import Found, Missing, Source

# A directory's outcomes are handed on in batches of at least this many (or all that are left):
# each batch costs a state file write and wakes the probe threads while the install threads
# keep every CPU busy hashing. Measured on 2 cores, 33 arches: handing on each outcome at once
# (about 19 batches) took ~40 ms more wall and ~100 ms more CPU than batches of 4. A .deb is
# read on one thread (the other CPUs are free for probes): each outcome goes on at once.
BATCH = 4
# What a corrupt or truncated source can raise from deep inside tarfile, gzip, xz or zlib.
SOURCE_ERRORS = (InstallError, OSError, EOFError, tarfile.TarError, zlib.error, lzma.LZMAError)


@dataclass(frozen=True)
class Outcome:
    """One arch's install: the record to keep, or why it failed (`absent`: the source has no
    file for it, which only a change of the source can cure)."""

    arch: str
    record: Installed | None = None
    error: str | None = None
    absent: bool = False


@dataclass(frozen=True)
class Job:
    """What every install of a pass shares. `hashes` is thread-safe; `clock` gives the
    installed_at wall-clock seconds."""

    source: Source
    install_dir: str
    host_machine: int | None
    allow_link: bool
    hashes: emulators.HashCache
    clock: Callable[[], float] = time.time


Batch = Callable[[list[Outcome]], None]
Results = queue.SimpleQueue[Outcome | BaseException]


def workers() -> int:
    """Install threads: one per usable CPU (hashing is CPU-bound; nothing waits on fsync)."""
    return usable_cpus()


def install(job: Job, arches: list[str], on_batch: Batch, threads: int | None = None) -> None:
    """Install `arches` and call `on_batch` (on this thread) with batches of outcomes (see
    BATCH) until each arch had exactly one. New names in the install
    directory are not fsynced: the caller does that once for all.

    If `on_batch` raises, the workers stop after the file each is on and the exception goes
    on; so does one a worker raised that is not a source failure (a bug)."""
    done: Results = queue.SimpleQueue()
    stop = threading.Event()
    groups = [arches] if job.source.kind is SourceKind.DEB else [[a] for a in arches]
    count = max(1, min(threads or workers(), len(groups)))
    pool = ThreadPoolExecutor(count, thread_name_prefix="install")
    try:
        for group in groups:
            pool.submit(_produce, job, group, done, stop)
        least = 1 if job.source.kind is SourceKind.DEB else BATCH
        left, ready = len(arches), []
        while left:
            ready.append(_raise_if_error(done.get()))
            while not done.empty():
                ready.append(_raise_if_error(done.get()))
            if len(ready) >= min(least, left):
                left -= len(ready)
                on_batch(ready)
                ready = []
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


def _raise_if_error(item: Outcome | BaseException) -> Outcome:
    if isinstance(item, BaseException):
        raise item
    return item


def _produce(job: Job, arches: list[str], done: Results, stop: threading.Event) -> None:
    """One outcome for each of `arches`, in the order the source yields them."""
    left = list(arches)
    try:
        for item in job.source.streams(arches):
            if stop.is_set():
                return
            if item.arch in left:
                left.remove(item.arch)
                done.put(_one(job, item))
    except SOURCE_ERRORS as exc:
        _fail(left, done, source_error(exc))
        return
    except BaseException as exc:  # a bug: handed to the calling thread, which raises it
        done.put(exc)
        return
    _fail(left, done, f"source {job.source.path} has no qemu-ARCH-static")


def _fail(arches: Iterable[str], done: Results, why: str) -> None:
    for arch in arches:
        done.put(Outcome(arch, error=why.replace("ARCH", arch)))


def _one(job: Job, item: Found | Missing) -> Outcome:
    """Install one item: its record, or why not."""
    if isinstance(item, Missing):
        return Outcome(item.arch, error=item.reason, absent=True)
    arch = item.arch
    try:
        source_id = job.source.identity(arch)
        done = emulators.install_stream(
            item.stream,
            arch,
            job.install_dir,
            job.host_machine,
            allow_link=job.allow_link,
            hashes=job.hashes,
            sync_dir=False,
        )
    except SOURCE_ERRORS as exc:
        return Outcome(arch, error=source_error(exc))
    record = Installed(
        arch,
        done.path,
        done.checksum,
        done.version,
        job.source.describe(),
        source_id,
        job.clock(),
        emulators.file_id(done.path) or "",
        origin=item.origin,
        package=item.package,
        package_version=item.version,
        method=done.method,
    )
    return Outcome(arch, record=record)


def source_error(exc: BaseException) -> str:
    """A source failure in words; a corrupt or truncated archive says so."""
    if isinstance(exc, InstallError | OSError):
        return str(exc)
    return f"the emulator source is corrupt or truncated ({type(exc).__name__}: {exc})"
