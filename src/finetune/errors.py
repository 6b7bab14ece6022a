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


def config_error_message(error: BaseException) -> str | None:
    """One line for a configuration error Hydra or OmegaConf raised, None for any other error.

    Hydra words these over several lines (with the config search path); this keeps what the user needs: the
    key or option, the valid choices, what to type instead.
    """
    from hydra.errors import CompactHydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, MissingConfigException) and error.options and error.missing_cfg_file:
        group, _, name = error.missing_cfg_file.rpartition("/")
        return (f"unknown {group}={name}{close_matches(name, list(error.options))}: choose one of "
                f"{', '.join(error.options)}")
    if isinstance(error, OverrideParseException):
        return (f"cannot read the override {error.override!r} ({error.message.splitlines()[0]}); write key=value, "
                "e.g. unfreeze=2 or data.split=[0.7,0.2,0.1]")
    cause = error.__cause__
    if isinstance(error, CompactHydraException) and isinstance(cause, OmegaConfBaseException) and cause.full_key:
        keys = list(cause.parent_node.keys()) if cause.parent_node is not None else []
        parent = cause.full_key.rpartition(".")[0]
        close = close_matches(str(cause.key), keys, prefix=f"{parent}." if parent else "")
        append = next((line.strip() for line in str(error).splitlines() if line.strip().startswith("To append")),
                      "")
        return f"unknown key {cause.full_key}{close}" + (f"; {append[0].lower()}{append[1:]}" if append else "")
    if isinstance(error, CompactHydraException | OmegaConfBaseException):
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return "; ".join(lines[:2]) if lines else type(error).__name__
    return None


def close_matches(name: str, choices: list[str], n: int = 5, prefix: str = "") -> str:
    """" (did you mean a, b?)" for the (at most `n`) choices that look like `name`, each shown after `prefix`,
    or ""."""
    import difflib

    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.6)
    return f" (did you mean {', '.join(prefix + choice for choice in close)}?)" if close else ""
