"""The committed generated modules are exactly what ``python -m k2serve.proto.codegen`` makes from the
``.proto`` files, so an edited contract cannot ship with stale code."""

from __future__ import annotations

from pathlib import Path

import pytest

from k2serve.proto import codegen


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    written = codegen.generate(tmp_path)
    assert written, "no .proto files found"
    for fresh in written:
        committed = codegen.HERE / fresh.name
        assert committed.exists(), f"{fresh.name} is not committed: run python -m k2serve.proto.codegen"
        assert committed.read_text() == fresh.read_text(), f"{fresh.name} is stale: run python -m k2serve.proto.codegen"
