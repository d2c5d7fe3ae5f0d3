"""Errors a user can cause and fix.

The CLI turns these into one line on stderr and a non-zero exit; anything else is a bug
and keeps its traceback.
"""


class StreamKWSError(Exception):
    """A problem with the user's input, files, devices or configuration."""


class ConfigError(StreamKWSError):
    """A configuration value is unknown, of the wrong type or out of range."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class ConfigFileError(ConfigError):
    """The config file itself cannot be read or parsed (no single key is at fault)."""

    def __init__(self, path: str, message: str) -> None:
        self.key = path
        StreamKWSError.__init__(self, f"{path}: {message}")


class AudioError(StreamKWSError):
    """Audio that cannot be read or a device that cannot be opened."""
