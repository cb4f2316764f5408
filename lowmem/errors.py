"""Errors meant for people.

Anything raised as a `LowmemError` is printed by the CLI as one line, with no
traceback unless `--debug` is given. Raise it where the cause is known and
the message can name the file, line or key and what was expected.
"""


class LowmemError(Exception):
    """A problem the user can fix; its message is the whole explanation."""


class ConfigError(LowmemError):
    """A bad preset, flag or `key=value` override."""


class DataError(LowmemError):
    """A dataset that is missing, empty or malformed."""


class ModelError(LowmemError):
    """A model that cannot be found or loaded."""


class CheckpointError(LowmemError):
    """A run directory or checkpoint that cannot be resumed from."""


class DivergedError(LowmemError):
    """Training produced a loss or gradient that is not finite (nan or inf)."""

