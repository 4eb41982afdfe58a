"""The errors written for the user: each message names the field, file or value, what is allowed, and the fix.

``train.py`` prints such an error as one line (``ep_lightning.config_checks.user_error`` finds it in the exception
chain that LightningCLI and jsonargparse wrap around it) instead of a traceback.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid or does not fit the data; the message names the field, value and fix."""


class DataFileError(RuntimeError):
    """A data file is missing, truncated or does not match its checksum."""


class DivergenceError(FloatingPointError):
    """NaN or Inf appeared in the weights, the states or the update of a training step."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, read-only folder); earlier checkpoints are left intact."""


__all__ = ["CheckpointWriteError", "ConfigError", "DataFileError", "DivergenceError"]
