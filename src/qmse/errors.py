"""The errors qmse raises for a mistake of the user's or of the environment.

`QmseError` is their base: the command line prints one as a single line (exit status 2);
any other exception is a bug and keeps its traceback. Each subclass also derives from the
built-in exception a Python caller would expect (a bad argument is a `ValueError`).
"""

from __future__ import annotations


class QmseError(Exception):
    """A mistake of the user's or of the environment, with a message that says what to do."""


class UserError(QmseError, ValueError):
    """A bad argument, configuration, file or directory: the message names it and the fix."""
