"""Errors caused by the user's input (params, data files, a diverging run), as opposed to bugs.

Stage scripts catch `UserError` and print its message alone: it already names the file, line
or param and says what to do.
"""


class UserError(Exception):
    """Something the user can fix; the message says where and how."""


class ConfigError(UserError, ValueError):
    """A params file (or override) is wrong; the message names every bad param."""


class DataError(UserError, ValueError):
    """A data file is wrong; the message starts with `path:line:` where a line is to blame."""


class TrainingError(UserError, RuntimeError):
    """Training went wrong in a way params can fix; the message says which param."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN/inf; the message names the step."""
