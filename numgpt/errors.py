"""User-facing errors.

Every problem a user can cause (a bad flag, a missing file, a corrupt checkpoint) is raised as a
subclass of `NumGPTError` whose message names the problem and the fix. The command-line fronts
(train.py, sample.py) catch `NumGPTError`, print its message and exit non-zero, so a user never sees
a traceback for their own mistake; anything else is a bug in numgpt and keeps its traceback.
"""


class NumGPTError(Exception):
    """A problem with the user's input, described in words the user can act on."""


class ConfigError(NumGPTError, ValueError):
    """An invalid model configuration or hyper-parameter."""


class CheckpointError(NumGPTError):
    """A checkpoint directory that is missing, incomplete or corrupt."""


class DataError(NumGPTError):
    """A data source that is missing, empty, unreadable or too small."""


class TrainingError(NumGPTError):
    """A run that cannot go on, such as one whose loss became NaN."""
