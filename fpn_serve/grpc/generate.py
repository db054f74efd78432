"""Regenerate the Python modules of ``grpc_service.proto`` (needs grpcio-tools, a dev dependency).

    python fpn_serve/grpc/generate.py

writes ``grpc_service_pb2.py`` (messages), ``grpc_service_pb2.pyi`` (their types) and
``grpc_service_pb2_grpc.py`` (the servicer base class and the client stub) beside the .proto. The
generated modules are committed, so that installing fpn-serve needs no code generation.

One change is made to protoc's output: the messages are registered in a descriptor pool of their
own instead of protobuf's default pool. Stock clients (tritonclient.grpc, KServe's) register the
same ``inference.*`` names in the default pool, and protobuf refuses a second file defining them,
so with the default pool a process could not import both this server and such a client.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "grpc_service.proto"
ROOT = HERE.parent.parent  # protoc's include root: generated imports read fpn_serve.grpc....
DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
OWN_POOL = "POOL = _descriptor_pool.DescriptorPool()  # not the default pool: see fpn_serve/grpc/generate.py\n"
OWN_POOL += "DESCRIPTOR = POOL.AddSerializedFile("


def generate() -> None:
    """Run protoc on the .proto and give the messages their own descriptor pool."""
    from grpc_tools import protoc  # dev only: never imported by the server

    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        str(PROTO.relative_to(ROOT)),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO.name}")
    messages = HERE / "grpc_service_pb2.py"
    text = messages.read_text()
    if DEFAULT_POOL not in text:
        raise SystemExit(f"{messages.name}: protoc's output changed; update generate.py's pool patch")
    messages.write_text(text.replace(DEFAULT_POOL, OWN_POOL, 1))


if __name__ == "__main__":
    generate()
    sys.exit(0)
