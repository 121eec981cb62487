"""A checkpoint folder of safetensors shards, opened lazily: k2serve reads safetensors only.

Lifecycle: ``CheckpointReader.open(model_dir)`` refuses folders holding any pickle-capable file,
resolves the tensor -> shard map (``model.safetensors.index.json``'s ``weight_map``, else the keys
of every ``*.safetensors`` file, e.g. a single ``model.safetensors``), and returns a context
manager. Shards are memory-mapped on first use (``safe_open``) and stay open until ``close()``;
``header(name)`` reads only the safetensors header, ``read(name)`` materialises one tensor.

Every problem with the files is a ``CheckpointError`` naming the tensor (or file) involved.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

_SAFETENSORS_DTYPES = MappingProxyType(
    {
        "BF16": torch.bfloat16,
        "F16": torch.float16,
        "F32": torch.float32,
        "F64": torch.float64,
        "I8": torch.int8,
        "U8": torch.uint8,
        "I16": torch.int16,
        "I32": torch.int32,
        "I64": torch.int64,
        "BOOL": torch.bool,
    }
)


class CheckpointError(ValueError):
    """The checkpoint folder does not hold what the config implies.

    ``tensor`` is the checkpoint tensor name (None for folder-level problems), ``expected`` and
    ``found`` the values that disagree (shape, dtype, ...), ``path`` the file involved if any.
    """

    def __init__(
        self,
        message: str,
        *,
        tensor: str | None = None,
        expected: Any = None,
        found: Any = None,
        path: Path | None = None,
    ) -> None:
        super().__init__(message)
        self.tensor = tensor
        self.expected = expected
        self.found = found
        self.path = path


class CheckpointReader:
    """Name -> shard map of one folder plus lazily opened ``safe_open`` handles."""

    def __init__(self, model_dir: Path, weight_map: dict[str, str], source: str) -> None:
        self.model_dir = model_dir
        self.weight_map = weight_map
        self.source = source  # where the map came from, for error messages
        self._handles: dict[str, Any] = {}
        self._present: set[str] = set()  # shards already seen on disk
        self._stack = ExitStack()

    @staticmethod
    def open(model_dir: str | Path) -> CheckpointReader:
        folder = Path(model_dir)
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint folder {folder} does not exist", path=folder)
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"refusing to load {folder}: it holds pickle-capable files {pickles}; k2serve loads "
                "safetensors only (pickle files can run arbitrary code). Remove them or convert the "
                "checkpoint to safetensors.",
                path=folder / pickles[0],
            )
        index = folder / INDEX_FILE
        if index.is_file():
            return CheckpointReader(folder, _read_index(index), INDEX_FILE)
        return CheckpointReader(folder, _scan_shards(folder), "the safetensors files' headers")

    # ---- context management --------------------------------------------------------------------

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()
        self._stack.close()

    # ---- tensors --------------------------------------------------------------------------------

    def shard_of(self, name: str, expected_shape: tuple[int, ...]) -> str:
        """The shard holding ``name``; raises if the map lacks it or the shard file is missing."""
        shard = self.weight_map.get(name)
        if shard is None:
            raise CheckpointError(
                f"missing tensor {name} (expected shape {list(expected_shape)}): not in {self.source} "
                f"of {self.model_dir}",
                tensor=name,
                expected=expected_shape,
                path=self.model_dir / INDEX_FILE if self.source == INDEX_FILE else self.model_dir,
            )
        if shard not in self._present:
            if not (self.model_dir / shard).is_file():
                raise CheckpointError(
                    f"tensor {name}: {self.source} points at shard {shard}, which does not exist in {self.model_dir}",
                    tensor=name,
                    expected=shard,
                    path=self.model_dir / shard,
                )
            self._present.add(shard)
        return shard

    def header(self, name: str, expected_shape: tuple[int, ...]) -> tuple[tuple[int, ...], torch.dtype | str]:
        """Shape and dtype of ``name`` from the shard header, without reading its data."""
        tensor_slice = self._slice(name, expected_shape)
        dtype_name = tensor_slice.get_dtype()
        return tuple(tensor_slice.get_shape()), _SAFETENSORS_DTYPES.get(dtype_name, dtype_name)

    def read(self, name: str, expected_shape: tuple[int, ...]) -> torch.Tensor:
        """Materialise ``name`` on the CPU (one tensor; the shard stays memory-mapped)."""
        handle = self._handle(self.shard_of(name, expected_shape))
        return handle.get_tensor(name)

    def _slice(self, name: str, expected_shape: tuple[int, ...]) -> Any:
        shard = self.shard_of(name, expected_shape)
        try:
            return self._handle(shard).get_slice(name)
        except Exception as exc:  # safetensors raises a bare SafetensorError for unknown names
            raise CheckpointError(
                f"missing tensor {name} (expected shape {list(expected_shape)}): {self.source} maps it to "
                f"{shard}, which does not contain it",
                tensor=name,
                expected=expected_shape,
                path=self.model_dir / shard,
            ) from exc

    def _handle(self, shard: str) -> Any:
        handle = self._handles.get(shard)
        if handle is None:
            path = self.model_dir / shard
            try:
                handle = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except Exception as exc:
                raise CheckpointError(f"cannot open shard {path}: {exc}", path=path) from exc
            self._handles[shard] = handle
        return handle


def _read_index(index: Path) -> dict[str, str]:
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {index}: {exc}", path=index) from exc
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index} has no 'weight_map' object of tensor -> shard file", path=index)
    for name, shard in weight_map.items():
        if Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise CheckpointError(
                f"{index} maps tensor {name} to {shard!r}: shards must be .safetensors files in the same folder",
                tensor=name,
                path=index,
            )
    return dict(weight_map)


def _scan_shards(folder: Path) -> dict[str, str]:
    shards = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if not shards:
        raise CheckpointError(
            f"no safetensors checkpoint in {folder}: neither {INDEX_FILE} nor *.safetensors", path=folder
        )
    weight_map: dict[str, str] = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt", device="cpu") as handle:
                names = list(handle.keys())
        except Exception as exc:
            raise CheckpointError(f"cannot open shard {shard}: {exc}", path=shard) from exc
        for name in names:
            if name in weight_map:
                raise CheckpointError(
                    f"tensor {name} appears in both {weight_map[name]} and {shard.name}", tensor=name, path=shard
                )
            weight_map[name] = shard.name
    return weight_map
