"""DESIGN.md §3: which k2serve package may import which, and where torch and ray may appear.

Every import statement in every source file is parsed (module level and inside functions), so a
lazy import cannot slip past the rule either.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("workers", "kernels", "router", "cluster", "proto", "loadtest")

# package -> k2serve subpackages it may import (itself always allowed)
ALLOWED_INTERNAL = {
    "kernels": set(),
    "workers": {"kernels", "proto"},
    "cluster": {"workers", "router", "proto"},
    "router": {"proto"},
    "loadtest": {"proto"},
    "proto": set(),
}
# package -> third-party top-level modules it must never import
FORBIDDEN_THIRD_PARTY = {
    "kernels": {"ray", "grpc", "fastapi"},
    "workers": {"ray", "fastapi"},
    "cluster": set(),
    "router": {"torch", "ray", "triton", "safetensors"},
    "loadtest": {"torch", "ray", "triton"},
    "proto": {"torch", "ray"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _sources(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "_pb2" not in p.name)


@pytest.mark.parametrize("package", FOLDERS)
def test_package_imports_follow_the_layer_table(package: str) -> None:
    violations = []
    for path in _sources(package):
        for lineno, module in _imports(path):
            top = module.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{lineno} imports {module}"
            if top in FOLDERS:
                violations.append(f"{where} (bare folder name; use k2serve.{module})")
            elif top == "k2serve":
                parts = module.split(".")
                target = parts[1] if len(parts) > 1 else ""
                if target != package and target not in ALLOWED_INTERNAL[package]:
                    violations.append(f"{where} (not allowed by DESIGN.md §3)")
            elif top in FORBIDDEN_THIRD_PARTY[package]:
                violations.append(f"{where} ({top} is forbidden in {package})")
    assert not violations, "\n".join(violations)


def test_ray_is_imported_only_in_cluster() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{lineno}"
        for folder in (*FOLDERS, "k2serve")
        if folder != "cluster"
        for path in _sources(folder)
        for lineno, module in _imports(path)
        if module.split(".")[0] == "ray"
    ]
    assert not offenders, offenders


def test_cli_module_imports_no_heavy_dependency_at_module_level() -> None:
    tree = ast.parse((ROOT / "k2serve" / "cli.py").read_text(encoding="utf-8"))
    top_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    names = {a.name.split(".")[0] for n in top_level if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in top_level if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & {"torch", "ray", "triton", "transformers", "k2serve"}


def test_the_boundary_check_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom k2serve.workers import config\nimport workers\n")
    modules = [m for _, m in _imports(bad)]
    assert modules == ["torch", "k2serve.workers", "workers"]
