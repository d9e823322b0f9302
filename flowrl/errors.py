"""User-facing errors of flowrl.

Every error a user can cause (bad config, bad data, a damaged run directory, ...) is a
`FlowRLError` whose message is ONE line naming the problem (file, key, shape, value) and the
fix. Programming errors inside flowrl stay ordinary Python exceptions.
"""

from __future__ import annotations


class FlowRLError(Exception):
    """Base class: a one-line message saying what is wrong and how to fix it."""


class ConfigError(FlowRLError):
    """An invalid or inconsistent configuration value (gin binding, flag)."""


class DatasetError(FlowRLError):
    """A dataset file or field that is missing, malformed or inconsistent."""


class CheckpointError(FlowRLError):
    """A checkpoint that cannot be written, or none that can be read."""


class RunDirError(FlowRLError):
    """A run directory that cannot be created, resumed or replaced as asked."""


class MetricsError(FlowRLError):
    """A metrics record or metrics file that cannot be written or read."""


class NumericalError(FlowRLError):
    """Non-finite values (NaN/inf) in losses, gradients or parameters."""
