"""The one exception a user's mistake raises; `slm.cli.main` prints it as one line and exits 2."""


class SlmError(Exception):
    """A problem the user can fix: the message names the bad value and what to do instead."""
