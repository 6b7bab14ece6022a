"""The one exception type for problems the user can fix (bad input, bad configuration, missing files)."""

import urllib.error


class UsageError(Exception):
    """A problem with the user's input: shown as one line (what, where, what to do), exit code 2."""


def find_usage_error(error: BaseException) -> UsageError | None:
    """The UsageError behind `error`, if any: Hydra's instantiate wraps what constructors raise."""
    while error is not None:
        if isinstance(error, UsageError):
            return error
        error = error.__cause__ or error.__context__
    return None


def close_matches(name: str, choices: list[str], n: int = 5, prefix: str = "") -> str:
    """ " (did you mean a, b?)" for the (at most `n`) choices that look like `name`, each shown after `prefix`,
    or ""."""
    import difflib

    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.6)
    return f" (did you mean {', '.join(prefix + choice for choice in close)}?)" if close else ""


def first_line(error: BaseException | str) -> str:
    """The first non-empty line of an exception's message (or of a text); the exception's type name if empty.
    A download error (urllib's URLError) says why in its `reason`."""
    if isinstance(error, urllib.error.URLError) and error.reason:
        error = error.reason if isinstance(error.reason, BaseException) else str(error.reason)
    lines = str(error).strip().splitlines()
    if lines:
        return lines[0].strip()
    return type(error).__name__ if isinstance(error, BaseException) else ""
