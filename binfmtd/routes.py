"""Request routing for the API socket, sans I/O: a parsed `Request` in, a decision out.

Every input is validated here, before the daemon's api sees it: the endpoint and method, the
arch name in `/v1/arches/<name>/{enable,disable}` (any name `arch.resolve` accepts: `aarch64`,
`arm64`, `linux/arm/v7`; unknown ones get 404 with "did you mean"), the `format` query and the
verify body. Read views are answered from `ViewCache`: encoded once per snapshot version.
Every route carries `endpoint`, the path template it matched, for the request metrics.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Protocol

from binfmtd import arch as archmod
from binfmtd import wire
from binfmtd.protocol import Request, encode_json

ARCH_NAME: Final = re.compile(r"[A-Za-z0-9_./-]{1,40}")
OTHER: Final = "other"


class View(StrEnum):
    """The read endpoints; each value names the `Api` method that renders it."""

    STATUS = "status"
    PLATFORMS = "platforms"
    PLATFORMS_BINFMT = "platforms_binfmt"
    HEALTH = "health"
    WORKER = "worker"
    INDEX = "index"
    METRICS = "metrics"


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
    endpoint: str = OTHER


@dataclass(frozen=True)
class Mutation:
    """Route to `Api.mutate(action, arg)`."""

    action: Action
    arg: dict[str, Any]
    endpoint: str = OTHER


@dataclass(frozen=True)
class Reject:
    """Answer with an error without reaching the api."""

    status: int
    message: str
    allow: str | None = None
    endpoint: str = OTHER


Route = Read | Mutation | Reject

_READ_PATHS: Final = {
    "/": View.INDEX,
    "/v1": View.INDEX,
    "/v1/": View.INDEX,
    "/v1/status": View.STATUS,
    "/v1/platforms": View.PLATFORMS,
    "/v1/health": View.HEALTH,
    "/v1/worker": View.WORKER,
    "/metrics": View.METRICS,
}
_PLAIN_MUTATIONS: Final = {
    "/v1/verify": Action.VERIFY,
    "/v1/reconcile": Action.RECONCILE,
    "/v1/reload": Action.RELOAD,
}


def route(request: Request) -> Route:
    """Map a request to what answers it; every input is validated here, before the api."""
    if request.path in _READ_PATHS:
        endpoint = "/v1" if request.path in {"/", "/v1/"} else request.path
        if request.method != "GET":
            return Reject(405, f"{request.path} only supports GET", "GET", endpoint)
        return _read_route(_READ_PATHS[request.path], request.query, endpoint)
    target = _mutation_target(request.path)
    if target is None:
        return Reject(404, f"no such endpoint: {request.path}; GET /v1 lists them")
    if request.method != "POST":
        return Reject(405, f"{request.path} only supports POST", "POST", target.endpoint)
    if isinstance(target, Reject):
        return target
    if target.action is Action.VERIFY:
        return _verify_route(request.body)
    return target


def _read_route(view: View, query: Mapping[str, str], endpoint: str) -> Route:
    if view is not View.PLATFORMS or query.get("format", "json") == "json":
        return Read(view, endpoint)
    if query["format"] == "binfmt":
        return Read(View.PLATFORMS_BINFMT, endpoint)
    return Reject(400, "format must be json or binfmt", endpoint=endpoint)


def _mutation_target(path: str) -> Mutation | Reject | None:
    if path in _PLAIN_MUTATIONS:
        return Mutation(_PLAIN_MUTATIONS[path], {}, path)
    parts = path.split("/")
    if len(parts) < 5 or parts[:3] != ["", "v1", "arches"]:
        return None
    if parts[-1] not in (Action.ENABLE, Action.DISABLE):
        return None
    endpoint = f"/v1/arches/{{name}}/{parts[-1]}"
    name = "/".join(parts[3:-1])
    if not ARCH_NAME.fullmatch(name):
        return Reject(
            400, f"invalid arch name {name!r}: expected [A-Za-z0-9_./-]{{1,40}}", None, endpoint
        )
    try:
        return Mutation(Action(parts[-1]), {"arch": archmod.canonical(name)}, endpoint)
    except archmod.UnknownArch as exc:
        return Reject(404, exc.message, None, endpoint)


def _verify_route(body: bytes) -> Mutation | Reject:
    endpoint = "/v1/verify"
    if not body.strip():
        return Mutation(Action.VERIFY, {}, endpoint)
    try:
        arg = json.loads(body)
    except (ValueError, RecursionError):
        return Reject(400, 'body must be JSON like {"arches": ["aarch64"]}', None, endpoint)
    if not isinstance(arg, dict) or set(arg) - {"arches"}:
        return Reject(400, 'body must be an object with only the key "arches"', None, endpoint)
    arches = arg.get("arches", [])
    if not isinstance(arches, list) or not all(_is_arch(a) for a in arches):
        message = "arches must be a list of names matching [A-Za-z0-9_./-]{1,40}"
        return Reject(400, message, None, endpoint)
    try:
        names = list(dict.fromkeys(archmod.canonical(a) for a in arches))
    except archmod.UnknownArch as exc:
        return Reject(404, exc.message, None, endpoint)
    return Mutation(Action.VERIFY, {"arches": names} if "arches" in arg else {}, endpoint)


def _is_arch(value: object) -> bool:
    return isinstance(value, str) and ARCH_NAME.fullmatch(value) is not None


def to_json(obj: object) -> object:
    """A wire record as its JSON shape; mappings (test doubles) pass through."""
    return obj.to_json() if isinstance(obj, wire.Record) else obj


INDEX_BODY: Final = encode_json(wire.IndexRecord(wire.ENDPOINTS).to_json())


class ViewSource(Protocol):
    """The read side of `server.Api`; each `View` value also names a method rendering it."""

    def version(self) -> int: ...
    def health(self) -> object: ...
    def metrics(self) -> bytes: ...


class ViewCache:
    """Encoded read bodies, rebuilt when `version()` moves; health and metrics never cached."""

    def __init__(self, api: ViewSource) -> None:
        self._api = api
        self._version: int | None = None
        self._cache: dict[View, bytes] = {}

    def body(self, view: View) -> bytes:
        """The encoded JSON body for `view` (metrics: the Prometheus text)."""
        if view is View.INDEX:
            return INDEX_BODY
        if view is View.HEALTH:
            return encode_json(to_json(self._api.health()))
        if view is View.METRICS:
            return self._api.metrics()
        version = self._api.version()
        if version != self._version:
            self._cache.clear()
            self._version = version
        body = self._cache.get(view)
        if body is None:
            body = self._cache[view] = encode_json(to_json(getattr(self._api, view.value)()))
        return body
