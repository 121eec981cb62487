"""``ConfigReader``: typed, path-aware reads from one mapping of the cluster YAML.

Lifecycle: ``ConfigReader(mapping, "pools.decode")`` wraps one section; each typed read
(``integer``, ``number``, ``text``, ``choice``, ``flag``, ``section``) pops its key, checks type and
range and raises ``ClusterConfigError`` with the dotted path of the key; ``finish()`` then rejects
whatever keys are left (unknown keys are errors, so a typo never silently becomes a default).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from k2serve.cluster.config_error import ClusterConfigError

_MISSING = object()


class ConfigReader:
    def __init__(self, data: Any, path: str = "") -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ClusterConfigError(path or "<root>", f"expected a mapping, got {type(data).__name__}")
        bad = [k for k in data if not isinstance(k, str)]
        if bad:
            raise ClusterConfigError(path or "<root>", f"keys must be strings, got {bad!r}")
        self._data: dict[str, Any] = dict(data)
        self.path = path

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self._data and self._data[key] is not None

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        value = self._data.pop(key, _MISSING)
        if value is _MISSING or value is None:
            if default is _MISSING:
                raise ClusterConfigError(self.where(key), "is required")
            return default
        return value

    def integer(
        self, key: str, default: Any = _MISSING, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ClusterConfigError(self.where(key), f"expected an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise ClusterConfigError(self.where(key), f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ClusterConfigError(self.where(key), f"must be <= {maximum}, got {value}")
        return value

    def optional_integer(self, key: str, *, minimum: int | None = None) -> int | None:
        if not self.has(key):
            self._data.pop(key, None)  # absent or an explicit null
            return None
        return self.integer(key, minimum=minimum)

    def number(
        self, key: str, default: Any = _MISSING, *, minimum: float | None = None, positive: bool = False
    ) -> float:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ClusterConfigError(self.where(key), f"expected a number, got {value!r}")
        if positive and value <= 0:
            raise ClusterConfigError(self.where(key), f"must be > 0, got {value}")
        if minimum is not None and value < minimum:
            raise ClusterConfigError(self.where(key), f"must be >= {minimum:g}, got {value}")
        return float(value)

    def optional_number(self, key: str, *, minimum: float | None = None) -> float | None:
        if not self.has(key):
            self._data.pop(key, None)
            return None
        return self.number(key, minimum=minimum)

    def text(self, key: str, default: Any = _MISSING) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str) or not value.strip():
            raise ClusterConfigError(self.where(key), f"expected a non-empty string, got {value!r}")
        return value

    def optional_text(self, key: str) -> str | None:
        if not self.has(key):
            self._data.pop(key, None)
            return None
        return self.text(key)

    def choice(self, key: str, choices: Sequence[str], default: Any = _MISSING) -> str:
        value = self.raw(key, default)
        if value not in choices:
            raise ClusterConfigError(self.where(key), f"expected one of {list(choices)}, got {value!r}")
        return str(value)

    def flag(self, key: str, default: Any = _MISSING) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise ClusterConfigError(self.where(key), f"expected true or false, got {value!r}")
        return value

    def port(self, key: str, default: Any = _MISSING) -> int:
        value = self.integer(key, default, minimum=0)
        if value > 65535:
            raise ClusterConfigError(self.where(key), f"must be a port in [0, 65535], got {value}")
        return value

    def section(self, key: str) -> ConfigReader:
        return ConfigReader(self._data.pop(key, None), self.where(key))

    def keys(self) -> list[str]:
        return list(self._data)

    def finish(self) -> None:
        if self._data:
            names = ", ".join(sorted(self._data))
            raise ClusterConfigError(self.where(sorted(self._data)[0]), f"unknown key (unknown here: {names})")
