"""The one exception type for problems the user can fix (bad input, bad configuration, missing files)."""


class UsageError(Exception):
    """A problem with the user's input: shown as one line (what, where, what to do), exit code 2."""


def find_usage_error(error: BaseException) -> UsageError | None:
    """The UsageError behind `error`, if any: Hydra's instantiate wraps what constructors raise."""
    while error is not None:
        if isinstance(error, UsageError):
            return error
        error = error.__cause__ or error.__context__
    return None
