"""User-facing errors.

`UserError` is the one exception the CLI turns into a single line on stderr and exit status 2.
Raise it for anything the user can fix (a missing file, a bad value, a corrupt trace); let
programming errors propagate as ordinary exceptions so that they are visible as bugs.
"""


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback."""

    exit_code = 2
