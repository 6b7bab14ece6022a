"""Every command is a Hydra app; `command` makes one, so that all of them answer a mistake the same way.

    from finetune import apps

    @apps.command("predict", PredictOptions, USAGE)     # a structured config: a dataclass stored in ConfigStore
    def main(options: PredictOptions) -> None:
        ...

    if __name__ == "__main__":
        sys.exit(main())                                # main(["key=value", ...]) runs it in-process

`train.py` does the same over its YAML configs: `@apps.command("train", config_path="conf")`.

A problem the user can fix becomes one line, `error: ...`, and exit code 2 (the words: `finetune.config.messages`):

- a `UsageError` raised anywhere in the command (Hydra's `instantiate` wraps what constructors raise; the cause
  chain is searched);
- what Hydra and OmegaConf raise while composing the configuration: an unknown key, a value of the wrong type or
  not among an Enum's choices, an unreadable override, an unknown config group option, a required key left out.
  For a structured config the line names the valid keys.

Anything else keeps its traceback; `HYDRA_FULL_ERROR=1` shows the traceback of usage errors too. A structured
config's command writes nothing by itself: no run folder, no `.hydra/`, no log file (`hydra.run.dir=.`,
`hydra.output_subdir=null`, Hydra's `none` logging configs, which leave Python's logging as it is); `--help`
prints its usage.

OmegaConf 2.3 rejects `typing.Literal` fields ("Unexpected type annotation"): a closed set of choices is an Enum,
whose members' names are the values the command line takes.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from finetune.config.messages import error_message, valid_keys
from finetune.errors import UsageError
from finetune.study.points import run_folder

log = logging.getLogger("finetune")

# ${study_run:<strategy>,<unfreeze>} in conf/experiment/depth_study*.yaml names a study's run folders.
OmegaConf.register_new_resolver("study_run", run_folder, replace=True)

# Set by `run` for the command it runs, so that the check inside the app tells the user's HYDRA_FULL_ERROR from ours.
_OURS = "FINETUNE_SET_HYDRA_FULL_ERROR"


def command(
    config_name: str, schema: type | None = None, usage: str | None = None, config_path: str | None = None
) -> Callable[[Callable], Callable[..., int]]:
    """Makes a function a Hydra app with one-line usage errors; the decorated function is its entry point.

    Args:
        config_name: the primary config (a YAML file under `config_path`, or the name `schema` is stored under).
        schema: a dataclass: stored in Hydra's ConfigStore (`register`), and the function receives an instance of
            it instead of the DictConfig.
        usage: what `--help` prints (with `schema`).
        config_path: the folder of YAML configs, relative to the function's file; None for a structured config.

    Returns:
        A decorator. The entry point it returns takes the arguments (None: `sys.argv[1:]`) and returns the exit
        code (see `run`).
    """
    if schema is not None:
        register(config_name, schema, usage or "")

    def decorate(function: Callable) -> Callable[..., int]:
        @functools.wraps(function)
        def task(cfg: DictConfig) -> Any:
            try:
                return function(options(cfg, schema) if schema is not None else cfg)
            except Exception as error:
                # Inside the app: an exception leaving it makes Hydra print its own "Error executing job" line.
                message = error_message(error, schema)
                if message is None or full_error_requested():
                    raise
                _report(message)
                raise SystemExit(2) from None

        app = hydra.main(version_base="1.3", config_path=config_path, config_name=config_name)(task)

        @functools.wraps(function)
        def main(argv: Sequence[str] | None = None) -> int:
            return run(app, argv, keys_of=schema)

        return main

    return decorate


def _report(message: str) -> None:
    """Prints the error line: into the run's log as well where Hydra set one up (train.py), else on stderr."""
    if HydraConfig.initialized() and HydraConfig.get().job_logging.get("handlers"):
        log.error("error: %s", message)
    else:
        print(f"error: {message}", file=sys.stderr)


def register(name: str, schema: type, usage: str) -> None:
    """Stores the dataclass `schema` in Hydra's ConfigStore as the primary config `name` of a command that writes
    only its own outputs.

    Args:
        name: the `config_name` its `@hydra.main` names.
        schema: the options; fields without a default (`omegaconf.MISSING`) are required, Enum fields take one of
            their members' names.
        usage: printed by `--help`.
    """
    store = ConfigStore.instance()
    store.store(name=f"{name}_options", node=schema)
    store.store(
        name=name,
        node={
            "defaults": [
                f"{name}_options",
                "_self_",
                # Hydra's default logging would add a log file and its own console format.
                {"override hydra/job_logging": "none"},
                {"override hydra/hydra_logging": "none"},
            ],
            "hydra": {
                "run": {"dir": "."},  # the current folder: Hydra creates no run folder
                "output_subdir": None,  # no .hydra/ with the composed config
                "help": {"template": usage},
            },
        },
    )


def options(cfg: DictConfig, schema: type) -> Any:
    """The composed configuration as an instance of its dataclass.

    Raises:
        UsageError: a required key was left out (the message names the valid keys).
    """
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UsageError(f"missing {', '.join(f'{key}=' for key in missing)}; valid keys: {valid_keys(schema)}")
    return OmegaConf.to_object(cfg)


def run(app: Callable[[], Any], argv: Sequence[str] | None = None, keys_of: type | None = None) -> int:
    """Runs a `@hydra.main` function (`command` made it); a configuration error becomes one line and exit code 2.

    Args:
        app: the decorated function.
        argv: the arguments, without the program name; None reads `sys.argv`.
        keys_of: the dataclass of a structured config: its keys are named in configuration errors.

    Returns:
        The exit code: 0, 2 after a usage error, 130 on Ctrl-C, or the code the app exits with (`--help`: 0).
        Other errors propagate with their traceback, as do usage errors under HYDRA_FULL_ERROR=1.
    """
    verbose = full_error_requested()
    saved = {key: os.environ.get(key) for key in ("HYDRA_FULL_ERROR", _OURS)}
    # Hydra then hands its errors (unknown keys, options, bad overrides) to us instead of printing them itself.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    os.environ[_OURS] = "" if verbose else "1"
    saved_argv = sys.argv
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        app()
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        message = error_message(error, keys_of)
        if message is None or verbose:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return 0


def full_error_requested() -> bool:
    """Whether the user asked for tracebacks (HYDRA_FULL_ERROR=1), as opposed to `run` setting it."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1" and not os.environ.get(_OURS)
