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


def close_matches(name: str, choices: list[str], n: int = 5, prefix: str = "") -> str:
    """" (did you mean a, b?)" for the (at most `n`) choices that look like `name`, each shown after `prefix`,
    or ""."""
    import difflib

    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.6)
    return f" (did you mean {', '.join(prefix + choice for choice in close)}?)" if close else ""
