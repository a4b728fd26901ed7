"""User-facing errors.

Every problem a user can cause (a bad flag, a missing file, a corrupt checkpoint) is raised as a
subclass of `NumGPTError` whose message names the problem and the fix. The command-line fronts
(train.py, sample.py) catch `NumGPTError`, print its message and exit non-zero, so a user never sees
a traceback for their own mistake; anything else is a bug in numgpt and keeps its traceback.
is_count and is_number are the type checks that many of those messages start from.
"""

import numpy as np


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


def is_count(value):
    """Whether `value` is an integer >= 0, NumPy's (np.int64) included. A bool is not one, though
    Python makes True an int: a flag in a number's place is a mistake."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0


def is_number(value):
    """Whether `value` is an int or a float, NumPy's (np.float32) included; a bool is not one."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
