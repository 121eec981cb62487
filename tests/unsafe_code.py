"""``scan``: an AST lint for code that deserializes or executes untrusted data (reliability.md S1, S4, S5).

Lifecycle: pure; ``scan(source, path)`` parses one file and returns a ``Hit`` (file, line, rule,
what) per use of:
- ``pickle-module``: importing (or reaching as ``ray.cloudpickle``) a module that unpickles or
  unmarshals: ``pickle``, ``_pickle``, ``cPickle``, ``dill``, ``cloudpickle``, ``marshal``,
  ``shelve``, ``joblib``, ``jsonpickle``, ``ray.cloudpickle``;
- ``pyobj-socket``: ``recv_pyobj`` / ``send_pyobj`` (ZeroMQ's pickle helpers, ShadowMQ);
- ``torch-load``: ``torch.load`` without ``weights_only=True``; ``numpy.load`` with
  ``allow_pickle=True``;
- ``remote-code``: any call with ``trust_remote_code=True`` (a literal True: a configuration
  flag threaded through is the accepted form);
- ``eval-exec``: the builtins ``eval``, ``exec`` and ``compile`` (``model.eval()`` and
  ``re.compile`` are methods, not these);
- ``yaml-load``: ``yaml.load``/``load_all`` without ``Loader=SafeLoader``/``CSafeLoader``, and
  ``yaml.unsafe_load``/``full_load`` (use ``yaml.safe_load``).
Names are resolved through the file's imports (``from torch import load as tl`` -> ``torch.load``);
``importlib.import_module("pickle")`` counts as an import.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PICKLE_MODULES = frozenset(
    {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib", "jsonpickle"}
)
PICKLE_QUALIFIED = ("ray.cloudpickle", "torch.serialization.pickle")
PYOBJ_METHODS = frozenset({"recv_pyobj", "send_pyobj"})
EXEC_BUILTINS = frozenset({"eval", "exec", "compile"})
SAFE_YAML_LOADERS = frozenset({"SafeLoader", "CSafeLoader", "yaml.SafeLoader", "yaml.CSafeLoader"})
UNSAFE_YAML = frozenset({"yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"})


@dataclass(frozen=True)
class Hit:
    path: str
    line: int
    rule: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.rule}] {self.what}"


def scan(source: str, path: str = "<source>") -> list[Hit]:
    tree = ast.parse(source, filename=path)
    visitor = _Visitor(path, _aliases(tree))
    visitor.visit(tree)
    return visitor.hits


def scan_files(root: Path, files: list[Path]) -> list[Hit]:
    hits: list[Hit] = []
    for file in files:
        hits += scan(file.read_text(encoding="utf-8"), str(file.relative_to(root)))
    return hits


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted name it stands for, from every import in the file."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


class _Visitor(ast.NodeVisitor):
    def __init__(self, path: str, aliases: dict[str, str]) -> None:
        self.path, self.aliases = path, aliases
        self.hits: list[Hit] = []

    def hit(self, node: ast.AST, rule: str, what: str) -> None:
        self.hits.append(Hit(self.path, getattr(node, "lineno", 0), rule, what))

    def resolve(self, node: ast.AST) -> str | None:
        dotted = _dotted(node)
        if dotted is None:
            return None
        head, _, rest = dotted.partition(".")
        full = self.aliases.get(head, head)
        return f"{full}.{rest}" if rest else full

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._check_module(node, alias.name)
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        for name in (module, *(f"{module}.{alias.name}" for alias in node.names)):
            if self._check_module(node, name):
                break  # one hit per statement
        self.generic_visit(node)

    def _check_module(self, node: ast.AST, module: str) -> bool:
        if module.split(".")[0] in PICKLE_MODULES or module.startswith(PICKLE_QUALIFIED):
            self.hit(node, "pickle-module", f"imports {module}")
            return True
        return False

    def visit_Attribute(self, node: ast.Attribute) -> None:
        name = self.resolve(node)
        if name is not None and name.startswith(PICKLE_QUALIFIED) and not isinstance(node.ctx, ast.Store):
            self.hit(node, "pickle-module", f"uses {name}")
            return  # one hit for ray.cloudpickle.loads, not one per attribute level
        if node.attr in PYOBJ_METHODS:
            self.hit(node, "pyobj-socket", f"{node.attr} unpickles what the socket receives")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = self.resolve(node.func)
        keywords = {k.arg: k.value for k in node.keywords if k.arg is not None}
        if name in ("torch.load", "torch.serialization.load") and not _is_true(keywords.get("weights_only")):
            self.hit(node, "torch-load", f"{name} without weights_only=True")
        if name == "numpy.load" and _is_true(keywords.get("allow_pickle")):
            self.hit(node, "torch-load", "numpy.load with allow_pickle=True")
        if _is_true(keywords.get("trust_remote_code")):
            self.hit(node, "remote-code", f"{name or 'a call'}(trust_remote_code=True)")
        if isinstance(node.func, ast.Name) and node.func.id in EXEC_BUILTINS and node.func.id not in self.aliases:
            self.hit(node, "eval-exec", f"{node.func.id}() runs code")
        if name in ("yaml.load", "yaml.load_all"):
            loader = keywords.get("Loader", node.args[1] if len(node.args) > 1 else None)
            if loader is None or self.resolve(loader) not in SAFE_YAML_LOADERS:
                self.hit(node, "yaml-load", f"{name} without Loader=SafeLoader (use yaml.safe_load)")
        if name in ("importlib.import_module", "__import__") and node.args:
            target = node.args[0]
            if isinstance(target, ast.Constant) and isinstance(target.value, str):
                self._check_module(node, target.value)
        if name in UNSAFE_YAML:
            self.hit(node, "yaml-load", f"{name} builds arbitrary objects (use yaml.safe_load)")
        self.generic_visit(node)
