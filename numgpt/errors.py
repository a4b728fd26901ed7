"""User-facing errors.

Every problem a user can cause (a bad flag, a missing file, a corrupt checkpoint) is raised as a
subclass of `NumGPTError` whose message names the problem and the fix. The command-line fronts
(train.py, sample.py) catch `NumGPTError`, print its message and exit non-zero, so a user never sees
a traceback for their own mistake; anything else is a bug in numgpt and keeps its traceback.
is_count and is_number are the type checks that many of those messages start from; saying and
describe_os_error put the operating system's errors (a full disk) in the same words.
"""

import contextlib

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


@contextlib.contextmanager
def saying(doing):
    """Re-raise an OSError of the block as one that says what failed: under saying("cannot write
    out/x"), a full disk is "cannot write out/x: No space left on device" (same errno, same subclass)."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, f"{doing}: {e.strerror or e}") from None


def describe_os_error(error):
    """An OSError in a user's words: its reason and file, without Python's "[Errno 28]"."""
    reason = error.strerror or str(error)
    return f"{reason}: {error.filename}" if error.filename else reason
