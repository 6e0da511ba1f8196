"""User-facing errors: each carries one line that says what is wrong and with which value.

The command-line entry points print ``error: <message>`` and exit non-zero for
these; anything else is a bug and keeps its traceback.
"""


class RaylocalError(Exception):
    """Base class of errors caused by the user's input or environment."""


class ConfigError(RaylocalError):
    """A configuration value or config file is invalid."""


class SpecError(ConfigError):
    """A part specification is invalid."""


class DataError(RaylocalError):
    """A dataset is missing or malformed."""


class CheckpointError(RaylocalError):
    """A checkpoint is missing, truncated, corrupted or does not fit the run."""


class DivergedError(RaylocalError):
    """Training diverged beyond what rollbacks could repair."""


class ClusterError(RaylocalError):
    """Ray could not be reached or cannot host the run."""
