"""The access matrix: who may reach which endpoint of a running `binfmtd --sandbox`.

Callers are real processes with real credentials: root, a member of the socket's group and an
unrelated user (a temporary system group and two system users, removed afterwards). The socket
is 0660 root:<group>, so the group may read, only uid 0 may mutate, and others cannot connect.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import signal
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import daemonutil as du
import pytest
from conftest import daemon_config
from daemonutil import run_daemon, wait_until

READS = [
    ("GET", "/v1/status"),
    ("GET", "/v1/platforms"),
    ("GET", "/v1/platforms?format=binfmt"),
    ("GET", "/v1/health"),
    ("GET", "/v1/worker"),
]
MUTATIONS = [
    ("POST", "/v1/verify"),
    ("POST", "/v1/reconcile"),
    ("POST", "/v1/arches/aarch64/disable"),
    ("POST", "/v1/arches/aarch64/enable"),
    ("POST", "/v1/reload"),
]
ENDPOINTS = READS + MUTATIONS
NO_CONNECT = "cannot connect"

# Run by the caller's own python (stdlib only): one request per endpoint, the outcomes as JSON.
CLIENT = r"""
import json, socket, sys
path, calls = sys.argv[1], json.loads(sys.argv[2])
out = []
for method, target in calls:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    try:
        s.connect(path)
    except OSError as exc:
        out.append("cannot connect")
        continue
    s.sendall(f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
              f"Content-Length: 0\r\n\r\n".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    out.append(int(data.split()[1]))
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Caller:
    """A process identity to call the API with."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


@dataclass(frozen=True)
class Accounts:
    """The temporary group and users."""

    group: str
    gid: int
    member: Caller
    other: Caller


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@pytest.fixture
def accounts() -> Iterator[Accounts]:
    """A temporary socket group, one member and one outsider; all removed afterwards."""
    tag = secrets.token_hex(3)
    group, member, other = f"bfmt-g{tag}", f"bfmt-m{tag}", f"bfmt-o{tag}"
    made: list[list[str]] = []
    try:
        _run(["groupadd", "--system", group])
        made.append(["groupdel", group])
        for user, extra in ((member, ["-G", group]), (other, [])):
            _run(["useradd", "--system", "-M", "-s", "/usr/sbin/nologin", *extra, user])
            made.insert(0, ["userdel", user])
        gid = grp.getgrnam(group).gr_gid

        def caller(user: str, groups: tuple[int, ...]) -> Caller:
            entry = pwd.getpwnam(user)
            return Caller(user, entry.pw_uid, entry.pw_gid, groups)

        yield Accounts(group, gid, caller(member, (gid,)), caller(other, ()))
    finally:
        for argv in made:
            subprocess.run(argv, check=False, capture_output=True, timeout=30)


def call_all(sock: str, who: Caller | None) -> list[int | str]:
    """Every endpoint, in order, as `who` (None: root); a status code or NO_CONNECT each."""
    result = subprocess.run(
        ["/usr/bin/python3", "-I", "-c", CLIENT, sock, json.dumps(ENDPOINTS)],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
        check=False,
        user=None if who is None else who.uid,
        group=None if who is None else who.gid,
        extra_groups=None if who is None else who.groups,
    )
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


def assert_socket_mode(path: str, gid: int) -> None:
    """0660, owner root, group the configured one."""
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, gid), (
        oct(st.st_mode),
        st.st_uid,
        st.st_gid,
    )


def test_access_matrix_and_socket_mode_across_restart_and_reload(
    tmp_path: Path, accounts: Accounts, sock: str, daemons: list[du.Daemon]
) -> None:
    """root: all 200; group member: reads 200, mutations 403; others: cannot connect; 0660 kept."""
    cfg = daemon_config(tmp_path, api={"socket": sock, "group": accounts.group})
    daemon = run_daemon(daemons, cfg, outer=False)  # host root: the group can be mapped
    daemon.wait_verified(["aarch64", "s390x"])
    assert_socket_mode(sock, accounts.gid)
    table = {
        "root": call_all(sock, None),
        "member": call_all(sock, accounts.member),
        "other": call_all(sock, accounts.other),
    }
    expected = {
        "root": [200] * len(ENDPOINTS),
        "member": [200] * len(READS) + [403] * len(MUTATIONS),
        "other": [NO_CONNECT] * len(ENDPOINTS),
    }
    assert table == expected, json.dumps(table)
    assert daemon.arches()["aarch64"]["state"] == "verified"  # disable, then enable again

    daemon.stop()
    daemon = run_daemon(daemons, cfg, outer=False)
    assert_socket_mode(sock, accounts.gid)
    assert call_all(sock, accounts.member)[: len(READS)] == [200] * len(READS)

    os.kill(daemon.pid, signal.SIGHUP)
    wait_until("config_reloaded", lambda: daemon.events("config_reloaded"), 10)
    assert_socket_mode(sock, accounts.gid)
    assert call_all(sock, accounts.other) == [NO_CONNECT] * len(ENDPOINTS)
