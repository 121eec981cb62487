"""``ConfigError``: the one error type of config.json parsing, naming the offending field."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is missing, unknown or inconsistent. ``field`` names the config.json key."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"config.json field '{field_name}': {message}")
        self.field = field_name
