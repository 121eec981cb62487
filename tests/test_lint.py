"""The tree is ruff clean, ruff formatted and mypy clean (rules in pyproject.toml).

mypy does not follow setuptools' editable-install finder, so the type check runs over a symlink
tree that lays the folders out as the installed ``k2serve`` namespace.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
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
