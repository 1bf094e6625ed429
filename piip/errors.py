"""The errors piip raises for what a user can fix; every layer raises them, and each message names the config
key or the file and what was expected."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that cannot build a model or a run; the message names the field."""


class DataError(ValueError):
    """Missing or malformed data on disk; the message names the file or folder and what was expected."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run; the message names the file."""
