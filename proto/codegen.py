"""Regenerate the committed protobuf/gRPC Python modules from the ``.proto`` files beside this one.

Run ``python -m k2serve.proto.codegen`` after editing a ``.proto`` (needs ``grpcio-tools``, a test
extra). The generated modules import each other as ``k2serve.proto.*``, so protoc runs over a
temporary tree where this folder appears as ``k2serve/proto``. ``tests/test_proto.py`` checks that
the committed files equal a fresh generation.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Generate every ``*.proto`` of this folder into ``out_dir``; returns the written files."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        package = root / "k2serve" / "proto"
        package.mkdir(parents=True)
        protos = sorted(HERE.glob("*.proto"))
        for proto in protos:
            shutil.copy(proto, package / proto.name)
        args = [
            "protoc",
            f"-I{root}",
            f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={root}",
            f"--pyi_out={root}",
            f"--grpc_python_out={root}",
            *(f"k2serve/proto/{p.name}" for p in protos),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        written = []
        for produced in sorted(package.iterdir()):
            if produced.name.endswith(SUFFIXES):
                target = out_dir / produced.name
                shutil.copy(produced, target)
                written.append(target)
        return written


if __name__ == "__main__":
    for path in generate(HERE):
        print(f"wrote {path}", file=sys.stderr)
