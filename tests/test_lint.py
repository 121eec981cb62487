"""The tree is ruff clean, ruff formatted and mypy clean (rules in pyproject.toml), and the package
bounds its waits with ``asyncio.timeout``, never ``asyncio.wait_for``.

mypy does not follow setuptools' editable-install finder, so the type check runs over a symlink
tree that lays the folders out as the installed ``k2serve`` namespace.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("workers", "kernels", "router", "cluster", "proto", "loadtest")


def _tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(path).exists():
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return path


def _run(args: list[str], cwd: Path = ROOT) -> None:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_reports_no_violation() -> None:
    _run([_tool("ruff"), "check", "--no-cache", str(ROOT)])


def test_ruff_format_leaves_every_file_unchanged() -> None:
    _run([_tool("ruff"), "format", "--check", "--no-cache", str(ROOT)])


def test_mypy_reports_no_error(tmp_path: Path) -> None:
    mypy = _tool("mypy")
    namespace = tmp_path / "k2serve"
    namespace.mkdir()
    for source in (ROOT / "k2serve").glob("*.py"):
        (namespace / source.name).symlink_to(source)
    for folder in SUBPACKAGES:
        (namespace / folder).symlink_to(ROOT / folder, target_is_directory=True)
    _run(
        [mypy, "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(tmp_path / "cache"), "-p", "k2serve"],
        cwd=tmp_path,
    )


def _package_lines(find: Callable[[str], list[int]], skip: Callable[[Path], bool] = lambda path: False) -> list[str]:
    """``path:line`` of every line ``find`` reports in the package's Python files (but ``skip``'s)."""
    sources = [ROOT / "k2serve", *(ROOT / folder for folder in SUBPACKAGES)]
    return [
        f"{path.relative_to(ROOT)}:{line}"
        for folder in sources
        for path in sorted(folder.rglob("*.py"))
        if not skip(path)
        for line in find(path.read_text())
    ]


def _wait_for_calls(source: str) -> list[int]:
    """Lines of ``asyncio.wait_for`` (however imported) in ``source``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module == "asyncio":
            lines += [node.lineno for alias in node.names if alias.name == "wait_for"]
        elif isinstance(node, ast.Attribute) and node.attr == "wait_for":
            if isinstance(node.value, ast.Name) and node.value.id == "asyncio":
                lines.append(node.lineno)
    return lines


def test_the_package_never_bounds_a_wait_with_asyncio_wait_for() -> None:
    """On Python 3.11 ``wait_for`` returns the result, and drops the cancel, when the task is cancelled
    as the awaited work finishes: a client that left mid-stream then never stopped its request."""
    assert _wait_for_calls("import asyncio\nasync def f(x):\n    return await asyncio.wait_for(x, 1)\n") == [3]
    assert _wait_for_calls("from asyncio import wait_for\n") == [1]
    found = _package_lines(_wait_for_calls, skip=lambda path: path.parts[len(ROOT.parts)] == "proto")
    assert found == [], "use `async with asyncio.timeout(...)` instead: " + ", ".join(found)


INTERNAL_STUBS = ("WorkerStub", "RegistryStub")


def _bare_internal_stubs(source: str) -> list[int]:
    """Lines that build a Worker or Registry stub outside ``authorized(...)``: calls that would not
    carry the cluster token."""
    tree = ast.parse(source)
    wrapped = {
        id(arg)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "authorized"
        for arg in node.args[:1]
    }
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and id(node) not in wrapped:
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in INTERNAL_STUBS:
                lines.append(node.lineno)
    return lines


def test_every_internal_stub_carries_the_cluster_token() -> None:
    """A rank or the registry refuses a call without the token: every stub the package builds for them
    goes through ``proto.cluster_token.authorized`` (which adds it, or nothing when there is none)."""
    assert _bare_internal_stubs("s = pb.WorkerStub(ch)\nt = authorized(pb.RegistryStub(ch), tok)\n") == [1]
    assert _bare_internal_stubs("s = authorized(WorkerStub(ch), None)\n") == []
    found = _package_lines(_bare_internal_stubs, skip=lambda path: path.name.endswith("_pb2_grpc.py"))
    assert found == [], "wrap with authorized(stub, cluster_token): " + ", ".join(found)


def _swallowed_cancels(source: str) -> list[int]:
    """Lines of ``contextlib.suppress(...)`` that name ``CancelledError`` (however imported)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name == "suppress" and any(
                (arg.attr if isinstance(arg, ast.Attribute) else getattr(arg, "id", "")) == "CancelledError"
                for arg in node.args
            ):
                lines.append(node.lineno)
    return lines


def test_the_package_never_suppresses_a_cancel() -> None:
    """``with suppress(CancelledError): await task`` also swallows a cancel of the awaiting task
    itself: its caller's ``task.cancel()`` or ``asyncio.timeout`` then has no effect. Wait with
    ``asyncio.gather(task, return_exceptions=True)`` or ``asyncio.wait`` instead."""
    assert _swallowed_cancels("with contextlib.suppress(asyncio.CancelledError, Exception):\n    pass\n") == [1]
    assert _swallowed_cancels("with suppress(CancelledError):\n    pass\n") == [1]
    assert _swallowed_cancels("with suppress(TimeoutError):\n    pass\n") == []
    found = _package_lines(_swallowed_cancels)
    assert found == [], "a suppressed CancelledError swallows the caller's cancel: " + ", ".join(found)
