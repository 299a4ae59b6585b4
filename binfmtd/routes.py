"""Request routing for the API socket, sans I/O: a parsed `Request` in, a decision out.

Every input is validated here, before the daemon's api sees it: the endpoint and method, the
arch name in `/v1/arches/<arch>/{enable,disable}`, the `format` query and the verify body.
Read views are answered from `ViewCache`: encoded once per snapshot version.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Protocol

from binfmtd.httpproto import Request, encode_json, response, response_bytes

ARCH_NAME: Final = re.compile(r"[a-z0-9_]{1,32}")


class View(StrEnum):
    """The read endpoints; each value names the `Api` method that renders it."""

    STATUS = "status"
    PLATFORMS = "platforms"
    PLATFORMS_BINFMT = "platforms_binfmt"
    HEALTH = "health"
    WORKER = "worker"


class Action(StrEnum):
    """The mutating endpoints, as passed to `Api.mutate`."""

    VERIFY = "verify"
    RECONCILE = "reconcile"
    ENABLE = "enable"
    DISABLE = "disable"
    RELOAD = "reload"


@dataclass(frozen=True)
class Read:
    """Route to a read view."""

    view: View


@dataclass(frozen=True)
class Mutation:
    """Route to `Api.mutate(action, arg)`."""

    action: Action
    arg: dict[str, Any]


@dataclass(frozen=True)
class Reject:
    """Answer with an error without reaching the api."""

    status: int
    message: str
    allow: str | None = None


Route = Read | Mutation | Reject

_READ_PATHS: Final = {
    "/v1/status": View.STATUS,
    "/v1/platforms": View.PLATFORMS,
    "/v1/health": View.HEALTH,
    "/v1/worker": View.WORKER,
}
_PLAIN_MUTATIONS: Final = {
    "/v1/verify": Action.VERIFY,
    "/v1/reconcile": Action.RECONCILE,
    "/v1/reload": Action.RELOAD,
}


def route(request: Request) -> Route:
    """Map a request to what answers it; every input is validated here, before the api."""
    if request.path in _READ_PATHS:
        if request.method != "GET":
            return Reject(405, f"{request.path} only supports GET", allow="GET")
        return _read_route(_READ_PATHS[request.path], request.query)
    target = _mutation_target(request.path)
    if target is None:
        return Reject(404, f"no such endpoint: {request.path}")
    if request.method != "POST":
        return Reject(405, f"{request.path} only supports POST", allow="POST")
    if isinstance(target, Reject):
        return target
    if target.action is Action.VERIFY:
        return _verify_route(request.body)
    return target


def _read_route(view: View, query: Mapping[str, str]) -> Route:
    if view is not View.PLATFORMS or query.get("format", "json") == "json":
        return Read(view)
    if query["format"] == "binfmt":
        return Read(View.PLATFORMS_BINFMT)
    return Reject(400, "format must be json or binfmt")


def _mutation_target(path: str) -> Mutation | Reject | None:
    if path in _PLAIN_MUTATIONS:
        return Mutation(_PLAIN_MUTATIONS[path], {})
    parts = path.split("/")
    if len(parts) != 5 or parts[:3] != ["", "v1", "arches"]:
        return None
    if parts[4] not in (Action.ENABLE, Action.DISABLE):
        return None
    if not ARCH_NAME.fullmatch(parts[3]):
        return Reject(400, f"invalid arch name {parts[3]!r}: expected [a-z0-9_]{{1,32}}")
    return Mutation(Action(parts[4]), {"arch": parts[3]})


def _verify_route(body: bytes) -> Mutation | Reject:
    if not body.strip():
        return Mutation(Action.VERIFY, {})
    try:
        arg = json.loads(body)
    except (ValueError, RecursionError):
        return Reject(400, 'body must be JSON like {"arches": ["aarch64"]}')
    if not isinstance(arg, dict) or set(arg) - {"arches"}:
        return Reject(400, 'body must be an object with only the key "arches"')
    arches = arg.get("arches", [])
    if not isinstance(arches, list) or not all(_is_arch(a) for a in arches):
        return Reject(400, "arches must be a list of names matching [a-z0-9_]{1,32}")
    return Mutation(Action.VERIFY, {"arches": arches} if "arches" in arg else {})


def _is_arch(value: object) -> bool:
    return isinstance(value, str) and ARCH_NAME.fullmatch(value) is not None


class ViewSource(Protocol):
    """The read side of `server.Api`; each `View` value also names a method rendering it."""

    def version(self) -> int: ...
    def health(self) -> Mapping[str, Any]: ...


class ViewCache:
    """Encoded read responses, rebuilt when `version()` moves; health is never cached."""

    def __init__(self, api: ViewSource) -> None:
        self._api = api
        self._version: int | None = None
        self._cache: dict[tuple[View, bool], bytes] = {}

    def response(self, view: View, keep_alive: bool) -> bytes:
        """The complete HTTP response for `view`."""
        if view is View.HEALTH:
            return response(200, self._api.health(), keep_alive=keep_alive)
        version = self._api.version()
        if version != self._version:
            self._cache.clear()
            self._version = version
        key = (view, keep_alive)
        if key not in self._cache:
            body = encode_json(getattr(self._api, view.value)())
            self._cache[key] = response_bytes(200, body, keep_alive=keep_alive)
        return self._cache[key]
