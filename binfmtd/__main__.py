"""`binfmtd`'s console script (and `python -m binfmtd`): `binfmtd.daemon.main` with the cyclic
garbage collector off while the process starts.

Start-up imports ~190 modules and creates ~50 dataclasses: objects that live as long as the
process, which the collector would otherwise scan some 40 times for nothing (~8 ms of a
--oneshot run). `binfmtd.daemon.startup_done` turns it on again once they are loaded, after
moving them out of its reach for good (`gc.freeze`), so later collections skip them too.
"""

from __future__ import annotations

import gc
import sys


def main() -> int:
    """Run binfmtd (see `binfmtd.daemon.main`); returns the exit code."""
    gc.disable()
    from binfmtd.daemon import main as run

    return run()


if __name__ == "__main__":
    sys.exit(main())
