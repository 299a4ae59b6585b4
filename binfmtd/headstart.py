"""The first pass's package lookup, started while binfmtd itself is still starting.

Starting (the interpreter, imports, configuration, namespaces, the lock) keeps one CPU busy for
about 100 ms while the others idle. A first pass on an empty install directory asks the package
manager which package each emulator came from, and `dpkg-query -S` reads every installed
package's file list to answer (about 80 ms of CPU, measured with 739 packages). `begin` starts
it on the idle CPU for the arches with nothing installed yet; the engine's first pass takes it
over (`Engine(packages=...)`); a later pass asks again.
"""

from __future__ import annotations

import os

from binfmtd import arch as archmod
from binfmtd import emulators
from binfmtd.config import Config
from binfmtd.emulators import InstallError
from binfmtd.sources import PackageOwners, Source, packages_soon


def begin(cfg: Config, machine: str | None = None) -> PackageOwners | None:
    """Start the package lookup for the source files of the configured arches that have no
    install on record in `cfg.state_file` (none on a warm start: then nothing runs, and
    None). `machine` is `uname -m` (its always-native arches are never installed). Never
    raises: what cannot start now is done by the pass, which reports its errors."""
    try:
        source = Source(cfg.source)
    except InstallError:
        return None
    native, _ = archmod.host_arches(machine or os.uname().machine)
    installed = emulators.read_state(cfg.state_file)
    wanted = [a for a in cfg.selected(native) if a not in installed]
    # {} for a .deb (its control file names the package) or a source that cannot be read now
    return packages_soon(source.origins(wanted)) if wanted else None
