"""Errors caused by the user's input (configs, data, paths), not by bugs.

Launchers catch :class:`UserError` and print its message without a traceback, exiting with
status 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names the file, line or config key and what is valid."""


class ConfigError(UserError):
    """An invalid configuration key or value."""


class DataError(UserError):
    """An unreadable or invalid data file or record."""


class NonFiniteError(UserError):
    """Training produced non-finite loss or gradients and the policy says stop (after a checkpoint).

    Reported like a user error (one line, exit 2): the cause is the data or the hyper-parameters,
    and the message says where the last good state was saved.
    """
