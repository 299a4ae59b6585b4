"""`--sandbox` maps the id range container runtimes need, from a helper in the parent namespace."""

from __future__ import annotations

from pathlib import Path

import daemonutil as du
from conftest import daemon_config

from binfmtd.ns import MAPPED_IDS, id_maps


def test_id_maps_cover_the_image_id_range_onto_the_same_host_ids() -> None:
    """0-65535 map onto themselves; a kept group above that range is added on its own line."""
    assert MAPPED_IDS == 65536
    assert id_maps() == ("0 0 65536", "0 0 65536")
    assert id_maps([5, 999, 70000, 70000]) == ("0 0 65536", "0 0 65536\n70000 70000 1")


def test_sandbox_started_as_root_maps_65536_ids(
    tmp_path: Path, sock: str, daemons: list[du.Daemon]
) -> None:
    """The daemon's user namespace maps uids and gids 0-65535 (so runc can use gid 5, nobody)."""
    daemon = du.run_daemon(
        daemons, daemon_config(tmp_path, api={"socket": sock, "group": None}), outer=False
    )
    for name in ("uid_map", "gid_map"):
        lines = Path(f"/proc/{daemon.pid}/{name}").read_text(encoding="ascii").split("\n")
        assert [line.split() for line in lines if line] == [["0", "0", "65536"]], name
