#!/usr/bin/env python3
"""Generate the gRPC stubs of proto/farm.proto into a directory (default: proto/).

The stubs are committed, so that a wheel or sdist built from a fresh clone
has them without a build-time protoc; tests/unit/test_packaging.py checks
that the committed files are what this script writes now. Run it (or
`make proto`) after editing farm.proto, with the grpcio-tools version that
setup.cfg pins, and raise the grpcio and protobuf floors in install_requires
if the generated code asks for newer runtimes.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "proto"
STUBS = ("farm_pb2.py", "farm_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc
    out_dir.mkdir(parents=True, exist_ok=True)
    rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
                      str(PROTO_DIR / "farm.proto")])
    if rc != 0:
        raise SystemExit(f"gen_proto: protoc failed with exit code {rc}")
    # protoc's gRPC stub imports its sibling as a top-level module; inside the
    # nlbfarm.proto package it must be relative.
    grpc_stub = out_dir / "farm_pb2_grpc.py"
    text = grpc_stub.read_text()
    fixed = text.replace("\nimport farm_pb2 as ", "\nfrom . import farm_pb2 as ", 1)
    if fixed == text:
        raise SystemExit("gen_proto: the generated farm_pb2_grpc.py no longer imports farm_pb2 as expected")
    grpc_stub.write_text(fixed)
    return [out_dir / name for name in STUBS]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR):
        print(path)
