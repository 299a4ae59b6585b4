"""YAML configuration -> frozen dataclasses. Errors name the file, the key and the line.

The schema is the dataclasses themselves: each field's type says what the YAML value must be,
its default is the default, and an unknown key is an error (a typo must not be ignored on a
root daemon). Pure apart from `load`, which reads the file.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from binfmtd import arch as archmod
from binfmtd import trust
from binfmtd.binfmt import FormatError, control_characters, normalize_flags, validate_interpreter

if TYPE_CHECKING:
    import yaml  # imported by `parse` only: a run without a configuration file never loads it

DEFAULT_PATH = "/etc/binfmtd/binfmtd.yaml"
MAX_CONFIG_BYTES = 1 << 20
# No C: with C, a setuid foreign binary runs QEMU as root, and QEMU obeys its caller's
# environment (QEMU_LOG_FILENAME, QEMU_STRACE...), so any local user can write root's files.
DEFAULT_FLAGS = "POF"
OLD_DEFAULT_FLAGS = "POCF"  # binfmtd 0.1's default ("FPC"), for the upgrade notice
BUILDKIT_SOCKET = "/run/binfmtd/buildkitd.sock"


# Where `source.kind: auto` looks for QEMU, in order (binfmtd.sources; here, so that checking a
# configuration never imports the source readers).
AUTO_DIRS = ("/usr/bin", "/usr/local/bin")


class SourceKind(StrEnum):
    """Where static QEMU binaries come from."""

    AUTO = "auto"
    DIRECTORY = "directory"
    DEB = "deb"


class ConflictPolicy(StrEnum):
    """What to do with an existing entry binfmtd did not make."""

    LEAVE = "leave"
    REPLACE = "replace"


class InstallMethod(StrEnum):
    """How emulator bytes reach the install directory."""

    AUTO = "auto"  # hard link when allowed, else reflink, else an in-kernel copy
    COPY = "copy"  # always bytes of our own: reflink, else an in-kernel copy


class LogFormat(StrEnum):
    """How log events are rendered."""

    AUTO = "auto"
    CONSOLE = "console"
    JSON = "json"


@dataclass(frozen=True)
class SourceConfig:
    """The configured source of emulators."""

    kind: SourceKind = SourceKind.AUTO
    path: str | None = None
    retry_initial_s: float = 2.0  # a failed install waits this long, doubling per failure,
    retry_max_s: float = 300.0  # up to this; a changed source is retried at once


@dataclass(frozen=True)
class ProbeConfig:
    """How verification probes run."""

    timeout_s: float = 10.0
    parallelism: int = 8


@dataclass(frozen=True)
class ApiConfig:
    """The Unix socket API."""

    socket: str = "/run/binfmtd/binfmtd.sock"
    group: str | None = "binfmtd"
    metrics_port: int | None = None


@dataclass(frozen=True)
class LogConfig:
    """Logging."""

    level: str = "info"
    format: LogFormat = LogFormat.AUTO


@dataclass(frozen=True)
class BuildkitConfig:
    """The `buildkit:` section of the daemon configuration, parsed once."""

    enabled: bool = False
    path: str = "buildkitd"
    socket: str = BUILDKIT_SOCKET
    state_dir: str = "/var/lib/binfmtd/buildkit"
    config_path: str = "/run/binfmtd/buildkitd.toml"
    base_config: str | None = None
    extra_args: tuple[str, ...] = ()
    containerd_worker: bool = False
    socket_group: str | None = "binfmtd"
    grace_s: float = 30.0
    debounce_s: float = 2.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    max_failures: int = 5
    start_timeout_s: float = 30.0
    health_interval_s: float = 5.0
    stable_s: float = 60.0
    run_dir: str = "/run/binfmtd/buildkit"
    proof_timeout_s: float = 60.0
    tcp_address: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @property
    def tls_files(self) -> tuple[str, ...]:
        """The CA, certificate and key buildkitd's TCP listener reads (empty without TCP)."""
        files = (self.tls_ca, self.tls_cert, self.tls_key)
        return tuple(f for f in files if f) if self.tcp_address else ()

    def problems(self) -> list[str]:
        """What is wrong with this section, each phrased for the operator (empty: fine)."""
        found = []
        for key in ("path", "socket", "state_dir", "config_path", "run_dir"):
            value = getattr(self, key)
            if key != "path" and not os.path.isabs(value):
                found.append(f"buildkit.{key}: must be an absolute path, got {value!r}")
        if self.tcp_address is not None:
            found += _tcp_problems(self)
        return found


def _tcp_problems(config: BuildkitConfig) -> list[str]:
    found = []
    host, sep, port = (config.tcp_address or "").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        found.append(
            f"buildkit.tcp_address: expected HOST:PORT (e.g. 0.0.0.0:1234), "
            f"got {config.tcp_address!r}"
        )
    for key in ("tls_ca", "tls_cert", "tls_key"):
        value = getattr(config, key)
        if not value:
            found.append(
                f"buildkit.{key}: required with tcp_address (the TCP listener is mutual TLS only)"
            )
        elif not os.path.isabs(value):
            found.append(f"buildkit.{key}: must be an absolute path, got {value!r}")
    return found


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    binfmt_misc: str = "/proc/sys/fs/binfmt_misc"
    install_dir: str = "/var/lib/binfmtd/qemu"
    state_file: str = "/var/lib/binfmtd/state.json"
    arches: tuple[str, ...] = ("all",)
    exclude: tuple[str, ...] = ()
    flags: str = DEFAULT_FLAGS
    conflict_policy: ConflictPolicy = ConflictPolicy.LEAVE
    install_method: InstallMethod = InstallMethod.AUTO
    reconcile_interval_s: float = 30.0
    reverify_interval_s: float = 600.0
    remove_on_stop: bool = False
    lock_file: str = "/run/binfmtd/binfmtd.lock"
    source: SourceConfig = field(default_factory=SourceConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    log: LogConfig = field(default_factory=LogConfig)
    buildkit: BuildkitConfig = field(default_factory=BuildkitConfig)
    config_file: str = "<defaults>"

    def selected(self, native: tuple[str, ...]) -> tuple[str, ...]:
        """The catalog names to provision: configured, minus excluded, minus host-native."""
        names = [a.name for a in archmod.CATALOG] if "all" in self.arches else list(self.arches)
        return tuple(n for n in names if n not in self.exclude and n not in native)

    def why_nothing_selected(self, native: tuple[str, ...]) -> str:
        """Why `selected(native)` is empty, in words: the excluded and the native names."""
        names = [a.name for a in archmod.CATALOG] if "all" in self.arches else list(self.arches)
        why = []
        excluded = [n for n in names if n in self.exclude]
        if excluded:
            why.append(f"{', '.join(excluded)} excluded by `exclude`")
        own = [n for n in names if n in native and n not in self.exclude]
        if own:
            verb = "is" if len(own) == 1 else "are"
            why.append(f"{', '.join(own)} {verb} this host's native architecture")
        return "; ".join(why) or "`arches` names none"


def for_sandbox(cfg: Config, runtime: str, state: str) -> Config:
    """Paths left at their defaults move under the sandbox's own `runtime` and `state`
    directories, so a sandbox never touches the host daemon's files or another sandbox's."""
    defaults = Config()
    moved = {
        "install_dir": f"{state}/qemu",
        "state_file": f"{state}/state.json",
        "lock_file": f"{runtime}/binfmtd.lock",
    }
    moved = {k: v for k, v in moved.items() if getattr(cfg, k) == getattr(defaults, k)}
    api = cfg.api
    if api.socket == defaults.api.socket:
        api = dataclasses.replace(api, socket=f"{runtime}/binfmtd.sock")
    kit = cfg.buildkit
    if kit.socket == defaults.buildkit.socket:
        kit = dataclasses.replace(
            kit,
            socket=f"{runtime}/buildkitd.sock",
            config_path=f"{runtime}/buildkitd.toml",
            state_dir=f"{state}/buildkit",
            run_dir=f"{runtime}/buildkit",
        )
    return dataclasses.replace(
        cfg,
        api=api,
        buildkit=kit,
        install_dir=moved.get("install_dir", cfg.install_dir),
        state_file=moved.get("state_file", cfg.state_file),
        lock_file=moved.get("lock_file", cfg.lock_file),
    )


class ConfigError(ValueError):
    """A configuration problem, already phrased for the operator."""


_LIMITS: dict[str, tuple[float, float]] = {
    "reconcile_interval_s": (0.05, 3600),
    "reverify_interval_s": (1, 86400),
    "timeout_s": (0.1, 600),
    "parallelism": (1, 64),
    "retry_initial_s": (0.05, 3600),
    "retry_max_s": (0.05, 86400),
    "metrics_port": (1, 65535),
}


_NAME_LISTS = frozenset({"arches", "exclude"})


def load(path: str | None, *, require_safe_mode: bool = False) -> Config:
    """Read and validate the YAML at `path` (None: all defaults).

    With `require_safe_mode` (root on the host) the file and every directory above it must
    pass the trust rule, and so must the directory that will hold `state_file`.
    """
    if path is None:
        cfg = Config()
        if require_safe_mode:
            _check_state_dir(cfg, "<defaults>")
        return cfg
    try:
        raw = _read_trusted(path) if require_safe_mode else _read(path)
        text = raw.decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: configuration is not UTF-8 text") from None
    cfg = parse(text, path)
    if require_safe_mode:
        _check_state_dir(cfg, path)
    return cfg


def _check_state_dir(cfg: Config, path: str) -> None:
    """Refuse a state_file whose directory (or the nearest existing one above it, since root
    makes the missing ones) is not trusted: a user who can write there controls root's state.
    A symbolic link on the way is refused too, as every later use refuses it: the state file
    would be written but never read (each restart reinstalling everything and taking
    binfmtd's entries for another tool's) and no probe root could be made (every arch failed)."""
    directory = os.path.dirname(cfg.state_file) or "/"
    while not os.path.lexists(directory) and directory != "/":
        directory = os.path.dirname(directory)
    try:
        trust.check_dir(directory)
    except trust.TrustError as exc:
        raise ConfigError(f"{path}: state_file: {cfg.state_file}: {exc}") from None
    except OSError as exc:
        raise ConfigError(
            f"{path}: state_file: {cfg.state_file}: cannot use {exc.filename}: {exc.strerror}"
        ) from None


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def _read_trusted(path: str) -> bytes:
    """A root daemon reads only a config that root alone can change, file and directories.

    Checked and read on one descriptor (see `trust`), so a rename race cannot swap the file.
    """
    try:
        return trust.read_file(path, max_bytes=MAX_CONFIG_BYTES, symlinks=True)
    except trust.TrustError as exc:  # its message names the one reason and the one fix
        raise ConfigError(f"{path}: refusing this configuration: {exc}") from None


def parse(text: str, path: str = "<string>") -> Config:
    """Validate YAML text into a Config."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if node is None:
        return dataclasses.replace(Config(), config_file=path)
    cfg: Config = _build(Config, node, path, "")
    cfg = dataclasses.replace(cfg, config_file=path)
    _check_semantics(cfg, path)
    return dataclasses.replace(
        cfg, arches=_canonical_names(cfg.arches), exclude=_canonical_names(cfg.exclude)
    )


def _canonical_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """QEMU names for whatever spelling the operator used (`arm64`, `linux/arm/v7`), once each."""
    return tuple(dict.fromkeys(n if n == "all" else archmod.canonical(n) for n in names))


def _where(path: str, node: yaml.Node, key: str) -> str:
    return f"{path}:{node.start_mark.line + 1}: {key or '<top>'}"


def _build(cls: type[Any], node: yaml.Node, path: str, prefix: str) -> Any:
    import yaml

    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{_where(path, node, prefix.rstrip('.'))}: expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.name != "config_file"}
    values: dict[str, Any] = {}
    for key_node, value_node in node.value:
        key = str(key_node.value)
        dotted = f"{prefix}{key}"
        if key not in fields or key in values:
            problem = "duplicate key" if key in values else "unknown key"
            raise ConfigError(f"{_where(path, key_node, dotted)}: {problem}")
        values[key] = _convert(hints[key], value_node, path, dotted)
    return cls(**values)


def _convert(hint: Any, node: yaml.Node, path: str, key: str) -> Any:
    import yaml

    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, node, path, key + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if _is_null(node):
            return None
        return _convert(next(a for a in args if a is not type(None)), node, path, key)
    if origin is tuple:
        if not isinstance(node, yaml.SequenceNode):
            raise ConfigError(f"{_where(path, node, key)}: expected a list")
        return tuple(_convert(args[0], item, path, key) for item in node.value)
    return _scalar(hint, node, path, key)


def _is_null(node: yaml.Node) -> bool:
    import yaml

    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _scalar(hint: Any, node: yaml.Node, path: str, key: str) -> Any:
    import yaml

    if not isinstance(node, yaml.ScalarNode) or _is_null(node):
        raise ConfigError(f"{_where(path, node, key)}: expected a {_type_name(hint)}")
    try:
        value = _construct(node)
    except (yaml.YAMLError, ValueError, TypeError) as exc:
        problem = str(exc).splitlines()[0]
        raise ConfigError(f"{_where(path, node, key)}: cannot read the value: {problem}") from None
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        try:
            return hint(value)
        except ValueError:
            allowed = ", ".join(m.value for m in hint)
            raise ConfigError(
                f"{_where(path, node, key)}: {value!r} is not one of: {allowed}"
            ) from None
    if hint is str and key in _NAME_LISTS and type(value) is int:
        value = str(value)  # `arches: [386]`: YAML reads Docker's name for i386 as a number
    if isinstance(value, str) and (bad := control_characters(value)):
        raise ConfigError(
            f"{_where(path, node, key)}: contains control characters {bad!r}; paths and names "
            "become binfmt_misc register strings and file names, where those break parsing"
        )
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint, False)
    if not ok:
        raise ConfigError(
            f"{_where(path, node, key)}: expected a {_type_name(hint)}, got {value!r}"
        )
    short = key.rsplit(".", 1)[-1]
    if short in _LIMITS and not _LIMITS[short][0] <= value <= _LIMITS[short][1]:
        low, high = _LIMITS[short]
        raise ConfigError(f"{_where(path, node, key)}: must be between {low} and {high}")
    return float(value) if hint is float else value


def _construct(node: yaml.ScalarNode) -> Any:
    import yaml

    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def _check_semantics(cfg: Config, path: str) -> None:
    for key in ("arches", "exclude"):
        for name in getattr(cfg, key):
            try:
                _ = name == "all" or archmod.resolve(name)
            except archmod.UnknownArch as exc:
                raise ConfigError(f"{path}: {key}: {exc.message}") from None
    try:
        flags = normalize_flags(cfg.flags)
    except FormatError as exc:
        raise ConfigError(f"{path}: flags: {exc}") from None
    if "F" not in flags:
        raise ConfigError(f"{path}: flags: must include F (fix-binary); got {cfg.flags!r}")
    for key in ("binfmt_misc", "install_dir", "state_file", "lock_file"):
        if not os.path.isabs(getattr(cfg, key)):
            raise ConfigError(f"{path}: {key}: must be an absolute path")
    longest = max((a.name for a in archmod.CATALOG), key=len)
    try:
        validate_interpreter(os.path.join(cfg.install_dir, f"qemu-{longest}"))
    except FormatError as exc:
        raise ConfigError(f"{path}: install_dir: {exc}") from None
    for problem in [*cfg.buildkit.problems(), *_path_clashes(cfg)]:
        raise ConfigError(f"{path}: {problem}")
    if cfg.source.kind is not SourceKind.AUTO and not cfg.source.path:
        raise ConfigError(f"{path}: source.path: required when source.kind is {cfg.source.kind}")
    if cfg.source.path is not None and not os.path.isabs(cfg.source.path):
        raise ConfigError(f"{path}: source.path: must be an absolute path")
    if cfg.source.retry_max_s < cfg.source.retry_initial_s:
        raise ConfigError(f"{path}: source.retry_max_s: must not be below source.retry_initial_s")


def _path_clashes(cfg: Config) -> list[str]:
    """binfmtd's own paths that collide: each file it writes (state, lock, socket) must be its
    own and outside the install directory (whose `qemu-*` files binfmtd replaces and removes),
    and nothing of binfmtd's may live in binfmt_misc or the emulator source's directory. One
    phrase per clash, naming both keys (e.g. a lock_file on an installed emulator failed at
    start with a traceback; a state_file named qemu-aarch64 there overwrote that emulator)."""
    files = {"state_file": cfg.state_file, "lock_file": cfg.lock_file, "api.socket": cfg.api.socket}
    found = []
    for key, value in files.items():
        if value.endswith("/"):
            found.append(f"{key}: must name a file, not a directory: {value}")
    norm = {k: os.path.normpath(v) for k, v in files.items()}
    keys = list(norm)
    for i, first in enumerate(keys):
        for second in keys[i + 1 :]:
            if norm[first] == norm[second]:
                found.append(
                    f"{first} and {second}: must be different files, both are {norm[first]}"
                )
    install = os.path.normpath(cfg.install_dir)
    for key, value in norm.items():
        if _within(value, install):
            found.append(
                f"{key}: {value} is inside install_dir {install}, whose files binfmtd replaces "
                "and removes: put it elsewhere"
            )
    kernel = os.path.normpath(cfg.binfmt_misc)
    for key, value in {"install_dir": install, **norm}.items():
        if _within(value, kernel):
            found.append(f"{key}: {value} is inside binfmt_misc ({kernel})")
    sources = [cfg.source.path] if cfg.source.kind is SourceKind.DIRECTORY else []
    if cfg.source.kind is SourceKind.AUTO:
        sources = list(AUTO_DIRS)
    for source in sources:
        if source is not None and os.path.normpath(source) == install:
            found.append(
                f"install_dir: {install} is the emulator source's directory: binfmtd would "
                "replace and remove the source's files; use a directory of its own"
            )
    return found


def _within(path: str, directory: str) -> bool:
    """Whether normalized `path` is `directory` or below it."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")
