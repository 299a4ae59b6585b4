"""The LLB definition that proves a platform through the worker: a RUN step of the probe.

Pure: builds protobuf messages, touches no socket or file. One definition per platform, the
shape of a Dockerfile `FROM scratch` + `COPY probe` + `RUN /probe`:
- a file op that writes the probe (bytes, mode 0755) into scratch at `/probe`;
- an exec op on that root running `/probe` as user 65534:65534 (nobody) with the network,
  hostname and process sandbox a RUN step gets, so whatever stops a RUN step stops it too:
  runc, seccomp, a missing emulator, and a user namespace without the ids images use (runc
  mounts devpts with gid=5 and switches to the image's USER);
- the terminal op, which only names the exec op's output (buildkitd takes the last entry).
Both real ops carry `ignore_cache` (a cached success would prove nothing now) and the
platform, so buildkitd runs the step as that platform's container.

buildkitd re-hashes every op after parsing (in Go field order) and rewrites the inputs, so the
digests here only need to be consistent among themselves: metadata is looked up by the digest
of the bytes as sent.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

PROBE_PATH = "/probe"
RUN_USER = "65534:65534"  # nobody: needs the full id range a Dockerfile USER line needs
RUN_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
SCRATCH = -1  # FileAction.input / secondaryInput: no input, an empty root
MAX_REQUEST_BYTES = 16 * 1024 * 1024  # gRPC's default receive limit in buildkitd


def _ops() -> ModuleType:
    return importlib.import_module("binfmtd.buildkit_pb.ops_pb2")


def digest_of(data: bytes) -> str:
    """The OCI digest (`sha256:<hex>`) of marshaled op bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def platform_message(platform: str) -> Any:
    """`os/arch[/variant]` as a pb.Platform."""
    parts = platform.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"not an OCI platform: {platform!r}")
    variant = parts[2] if len(parts) == 3 else ""
    return _ops().Platform(OS=parts[0], Architecture=parts[1], Variant=variant)


@dataclass(frozen=True)
class ProbeDefinition:
    """A marshaled `pb.Definition`; `name` is the exec op's vertex name in the Status stream.

    The name, not a digest, identifies the step there: buildkitd reports re-hashed digests.
    """

    data: bytes
    name: str


def probe_definition(platform: str, probe: bytes, name: str) -> ProbeDefinition:
    """The definition that runs `probe` as a RUN step of `platform`; `name` labels the step."""
    ops = _ops()
    target = platform_message(platform)
    mkfile = ops.FileActionMkFile(path=PROBE_PATH, mode=0o755, data=probe, timestamp=0)
    action = ops.FileAction(input=SCRATCH, secondaryInput=SCRATCH, output=0, mkfile=mkfile)
    file_op = _marshal(ops.Op(file=ops.FileOp(actions=[action]), platform=target))
    run = ops.ExecOp(
        meta=ops.Meta(args=[PROBE_PATH], env=list(RUN_ENV), cwd="/", user=RUN_USER),
        mounts=[ops.Mount(input=0, dest="/", output=0)],
    )
    exec_op = _marshal(
        ops.Op(inputs=[ops.Input(digest=digest_of(file_op), index=0)], exec=run, platform=target)
    )
    terminal = _marshal(ops.Op(inputs=[ops.Input(digest=digest_of(exec_op), index=0)]))
    metadata = {
        digest_of(file_op): ops.OpMetadata(ignore_cache=True),
        digest_of(exec_op): ops.OpMetadata(ignore_cache=True, description={"llb.customname": name}),
    }
    definition = ops.Definition(**{"def": [file_op, exec_op, terminal]}, metadata=metadata)
    data = _marshal(definition)
    if len(data) > MAX_REQUEST_BYTES:
        raise ValueError(f"probe definition for {platform} is {len(data)} bytes, over 16 MiB")
    return ProbeDefinition(data, name)


def _marshal(message: Any) -> bytes:
    data: bytes = message.SerializeToString(deterministic=True)
    return data
