"""The one exception type for problems the user can fix (bad input, bad configuration, missing files)."""


class UsageError(Exception):
    """A problem with the user's input: shown as one line (what, where, what to do), exit code 2."""
