"""The one exception type that speaks to the user.

Anything raised as `UserError` is printed by the CLI as a one-paragraph message with a non-zero exit and
no traceback (unless `--debug`). Raise it for bad input: paths, layouts, architectures, checkpoints.
"""


class UserError(Exception):
    """A problem with what the user gave us, with a message that says what was expected."""
