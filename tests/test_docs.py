"""The commands README.md and docs/*.md show in their code blocks: each one's `--help` runs, and every `key=value`
they pass composes (Hydra's compose API over conf/train.yaml for train.py, the structured config of the others).

A renamed key, group option or command then fails here, not in a reader's terminal. Placeholders (`<run>`,
`/path/to/images`) stand as values: composing checks keys, options and types, not whether a path exists.
"""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from dataclasses import dataclass

import pytest
from conftest import REPO, train_py
from hydra import compose, initialize, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
COMMAND = re.compile(r"python (train\.py|-m finetune\.\w+)(.*)")
# finetune.train([...]) in a Python block: the same overrides as train.py's.
API_CALL = re.compile(r"finetune\.train\((\[.*?\])")
# A whole-word placeholder such as `<same overrides>` or `[same overrides as the first time]`: prose, not an override.
PROSE = re.compile(r"(?<!\S)(<[^<>=]*>|\[[^\[\]=]*\])(?!\S)")
# Hydra's own flags in the documented lines; --cfg and --info take a word after them.
FLAGS = {"-m", "--multirun", "--help"}
FLAGS_WITH_VALUE = {"--cfg", "--info"}


@dataclass(frozen=True)
class Documented:
    command: str  # "train.py" or "finetune.<module>"
    arguments: tuple[str, ...]
    where: str  # file:line, for the failure message

    def __str__(self) -> str:
        return f"{self.where}: python {'' if self.command == 'train.py' else '-m '}{self.command} " + " ".join(
            self.arguments
        )


def documented() -> list[Documented]:
    """Every command line of train.py and `python -m finetune.*` in the docs' fenced code blocks."""
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for fence in FENCE.finditer(text):
            first_line = text.count("\n", 0, fence.start(2)) + 1
            for index, line in _lines(fence.group(2)):
                where = f"{path.relative_to(REPO)}:{first_line + index}"
                for call in API_CALL.findall(line):
                    found.append(Documented("train.py", tuple(ast.literal_eval(call)), where))
                match = COMMAND.search(line)
                if match and not line.lstrip().startswith("#"):
                    words = shlex.split(PROSE.sub(" ", match.group(2)), comments=True)
                    found.append(Documented(match.group(1).removeprefix("-m "), tuple(words), where))
    return found


def _lines(body: str):
    """(index, line) for each line of a block, a line that ends in a backslash joined with the next."""
    lines, index = body.splitlines(), 0
    while index < len(lines):
        start, line = index, lines[index]
        while line.endswith("\\") and index + 1 < len(lines):
            index += 1
            line = line[:-1] + " " + lines[index]
        yield start, line
        index += 1


DOCUMENTED = documented()
COMMANDS = sorted({entry.command for entry in DOCUMENTED})
PLACEHOLDER = re.compile(r"<([^<>]*)>")


def test_the_docs_show_every_command():
    """The extraction itself: if it found nothing, every test below would pass vacuously."""
    expected = {"train.py", "finetune.report", "finetune.predict", "finetune.evaluate", "finetune.export"}
    assert expected <= set(COMMANDS), COMMANDS
    assert len(DOCUMENTED) >= 30


def run_command(command: str, arguments: list[str]) -> int:
    """Runs `python <command> <arguments>` in this process, through what `__main__` runs; returns the exit code."""
    if command == "train.py":
        return train_py(arguments)
    try:
        return importlib.import_module(command).main(arguments)
    except SystemExit as exit:  # argparse's --help
        return 0 if exit.code is None else exit.code


@pytest.mark.parametrize("command", COMMANDS)
def test_help_runs(command, capsys):
    """`--help` for every documented command, in this process (one import of torch instead of one per command)."""
    code = run_command(command, ["--help"])
    out = capsys.readouterr()
    assert code == 0, f"{command} --help exited {code}\n{out.out}\n{out.err}"
    # Hydra's help for train.py lists the config groups; each other command's usage names the command.
    assert ("== Configuration groups ==" if command == "train.py" else f"python -m {command}") in out.out, out.out


def overrides(entry: Documented) -> list[str]:
    """The entry's key=value arguments, placeholders as plain words; anything else must be one of Hydra's flags."""
    result, words = [], iter(entry.arguments)
    for word in words:
        if word in FLAGS_WITH_VALUE:
            next(words)
        elif word not in FLAGS:
            assert "=" in word, f"{entry}: {word!r} is neither key=value nor a flag"
            result.append(PLACEHOLDER.sub(lambda match: match.group(1).replace(" ", "_"), word))
    return result


def variants(arguments: list[str]) -> list[list[str]]:
    """The override lists a sweep's jobs would compose: each value of each `key=a,b,c` at least once."""
    parsed = OverridesParser.create().parse_overrides(arguments)
    options = [
        [f"{override.get_key_element()}={value}" for value in override.sweep_string_iterator()]
        if override.is_sweep_override()
        else [argument]
        for override, argument in zip(parsed, arguments, strict=True)
    ]
    first = [values[0] for values in options]
    jobs = [first]
    for index, values in enumerate(options):
        jobs += [[*first[:index], value, *first[index + 1 :]] for value in values[1:]]
    return jobs


TRAIN = [entry for entry in DOCUMENTED if entry.command == "train.py"]
OTHERS = [entry for entry in DOCUMENTED if entry.command not in ("train.py", "finetune.blocks") and overrides(entry)]


@pytest.mark.parametrize("entry", TRAIN, ids=lambda entry: entry.where)
def test_train_overrides_compose(entry):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for job in variants(overrides(entry)):
            try:
                compose("train", overrides=job, return_hydra_config=True)
            except Exception as error:
                pytest.fail(f"{entry}\ndoes not compose as {job}: {type(error).__name__}: {error}")


@pytest.mark.parametrize("entry", OTHERS, ids=lambda entry: entry.where)
def test_command_overrides_compose(entry):
    """The structured config the command registered (finetune.apps.register) takes every documented key=value."""
    importlib.import_module(entry.command)  # registers its options in Hydra's ConfigStore
    name = entry.command.removeprefix("finetune.")
    with initialize(config_path=None, version_base="1.3"):
        try:
            compose(name, overrides=overrides(entry))
        except Exception as error:
            pytest.fail(f"{entry}\ndoes not compose: {type(error).__name__}: {error}")
