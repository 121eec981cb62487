"""``ClusterConfigError``: the one error type of cluster-config parsing, naming the offending field."""

from __future__ import annotations


class ClusterConfigError(ValueError):
    """A cluster-config value is missing, unknown or inconsistent.

    ``field`` is the dotted path of the offending key in the YAML file (``pools.decode.ep_size``);
    ``message`` says what is wrong with it.
    """

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"cluster config field '{field_name}': {message}")
        self.field = field_name
        self.message = message
