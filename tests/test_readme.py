"""The README's examples run as written: every ```python block runs (fresh namespace, empty working directory),
and every ``clipheads ...`` command of its shell blocks and its command table names an existing command and only
options that command has (parsed with the typer app)."""

from __future__ import annotations

import re
import shlex
import traceback
from pathlib import Path

import pytest
import typer.main

from clipheads.cli import app

try:  # typer 0.2x parses with its own copy of click
    from typer._click import ClickException, Context
except ImportError:  # pragma: no cover - older typer on click
    from click import ClickException, Context

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```(\S*)\s*$")
SHELL_LANGS = {"bash", "sh", "shell", "console"}


def code_blocks(text: str) -> list[tuple[str, int, str]]:
    """``(language, line of the first code line (1-based), code)`` of every fenced block."""
    blocks, lang, start, lines = [], None, 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if lang is None and match:
            lang, start, lines = match.group(1).lower(), number + 1, []
        elif lang is not None and line.strip() == "```":
            blocks.append((lang, start, "\n".join(lines) + "\n"))
            lang = None
        elif lang is not None:
            lines.append(line)
    assert lang is None, f"README.md: the code block opened at line {start - 1} is never closed"
    return blocks


BLOCKS = code_blocks(README.read_text(encoding="utf-8"))
PYTHON = [(line, code) for lang, line, code in BLOCKS if lang == "python"]
SHELL = [(line, code) for lang, line, code in BLOCKS if lang in SHELL_LANGS]


def test_the_readme_has_python_and_shell_blocks():
    assert PYTHON, "README.md has no ```python block"
    assert SHELL, "README.md has no ```bash block"


@pytest.mark.parametrize(("line", "code"), PYTHON, ids=[f"README.md:{line}" for line, _ in PYTHON])
def test_python_block_runs(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # padded so that a traceback names the README's own line numbers
    compiled = compile("\n" * (line - 1) + code, str(README), "exec")
    try:
        exec(compiled, {"__name__": "__readme__"})  # noqa: S102 - the README's own example
    except Exception as exc:  # noqa: BLE001 - report which block and line failed
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(README)]
        where = frames[-1].lineno if frames else line
        pytest.fail(f"README.md python block starting at line {line} failed at line {where}: "
                    f"{type(exc).__name__}: {exc}")


# ------------------------------------------------------------------ shell commands
ROOT = typer.main.get_command(app)
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
OPERATORS = {"&&", "||", ";", "|", "&", "(", ")"}


def shell_commands(code: str) -> list[list[str]]:
    """The ``clipheads`` command lines of a shell block, as argument lists (``clipheads`` first).

    Continuation lines are joined, comments dropped, ``&&``/``;``/``|`` split commands, leading ``VAR=value``
    assignments are dropped, and ``$VAR`` is expanded from ``VAR="..."`` lines earlier in the block."""
    variables: dict[str, str] = {}
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens, current = list(lexer), []
        for token in [*tokens, ";"]:
            if token not in OPERATORS:
                current.append(token)
                continue
            words = list(current)
            current = []
            while words and ASSIGNMENT.match(words[0]):
                name, _, value = words.pop(0).partition("=")
                if not words:
                    variables[name] = value
            expanded = []
            for word in words:
                if word.startswith("$") and word[1:] in variables:
                    expanded.extend(shlex.split(variables[word[1:]]))
                else:
                    expanded.append(word)
            if expanded and expanded[0] == "clipheads":
                commands.append(expanded)
    return commands


def resolve(args: list[str]):
    """Follow the sub-commands of ``clipheads ARGS``: (the command, its path, the arguments left for it)."""
    command, path, rest = ROOT, ["clipheads"], list(args[1:])
    while hasattr(command, "commands") and rest and not rest[0].startswith("-"):  # a group
        name = rest.pop(0)
        sub = command.commands.get(name)
        assert sub is not None, f"`{' '.join(path)} {name}` is not a command (has: {', '.join(command.commands)})"
        command, path = sub, [*path, name]
    assert not hasattr(command, "commands"), f"`{' '.join(path)}` needs a sub-command"
    return command, path, rest


def option_names(command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        if param.param_type_name == "option":
            names.update(param.opts)
            names.update(getattr(param, "secondary_opts", ()))
    return names


def check_options(command, path: list[str], words: list[str]) -> None:
    known = option_names(command)
    for word in words:
        if word.startswith("-") and word != "-":
            name = word.split("=", 1)[0]
            assert name in known, f"`{' '.join(path)}` has no option {name} (has: {', '.join(sorted(known))})"


def parse(command, path: list[str], words: list[str]) -> None:
    """click's own option parser: known options, a value for each option that takes one, no value for a flag, no
    stray words (required options and value types are not checked: the files the examples name do not exist here)."""
    _, extra, _ = command.make_parser(Context(command, info_name=" ".join(path))).parse_args(args=list(words))
    n_arguments = sum(1 for p in command.params if p.param_type_name == "argument")
    assert len(extra) <= n_arguments, f"`{' '.join(path)}` got unexpected words {extra}"


SHELL_COMMANDS = [(line, args) for line, code in SHELL for args in shell_commands(code)]


def test_the_shell_blocks_call_clipheads():
    assert SHELL_COMMANDS, "no `clipheads ...` command found in the README's shell blocks"


@pytest.mark.parametrize(("line", "args"), SHELL_COMMANDS,
                         ids=[f"README.md:{line}:{' '.join(a[:3])}" for line, a in SHELL_COMMANDS])
def test_shell_command_exists_with_its_options(line, args):
    try:
        command, path, rest = resolve(args)
        check_options(command, path, rest)
        parse(command, path, rest)
    except (AssertionError, ClickException) as exc:
        message = exc.format_message() if isinstance(exc, ClickException) else str(exc)
        pytest.fail(f"README.md shell block starting at line {line}: `{' '.join(args)}`: {message}")


# ------------------------------------------------------------------ the command table
def table_commands(text: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every inline code span that starts with ``clipheads `` in a table row."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("|"):
            found += [(number, span) for span in re.findall(r"`(clipheads [^`]*)`", line)]
    return found


TABLE = table_commands(README.read_text(encoding="utf-8"))


@pytest.mark.parametrize(("line", "code"), TABLE, ids=[f"README.md:{line}:{code[:30]}" for line, code in TABLE])
def test_table_command_exists_with_its_options(line, code):
    # placeholders ("[--quick]", "ga\|bp", "--order 1\|2") are not shell syntax: read the words and option names
    words = re.sub(r"[\[\]]", " ", code.replace("\\|", "|")).split()
    try:
        command, path, rest = resolve(words)
        check_options(command, path, [w for w in rest if w.startswith("--") or re.fullmatch(r"-[a-zA-Z]", w)])
    except AssertionError as exc:
        pytest.fail(f"README.md line {line}: `{code}`: {exc}")


def test_the_checks_catch_a_wrong_command_and_option():
    """The checks above are not vacuous: an unknown command and an unknown option fail."""
    with pytest.raises(AssertionError, match="is not a command"):
        resolve(["clipheads", "no-such-command"])
    command, path, rest = resolve(["clipheads", "bake", "--mask", "m.json", "--no-such-option"])
    with pytest.raises(AssertionError, match="has no option --no-such-option"):
        check_options(command, path, rest)
    with pytest.raises(ClickException, match="requires an argument"):
        parse(command, path, ["--out"])
    with pytest.raises(AssertionError, match="unexpected words"):
        parse(command, path, ["--overwrite", "stray"])
    assert shell_commands('X="--op zero"\nOMP_NUM_THREADS=1 clipheads bake $X --out b  # note\n') == [
        ["clipheads", "bake", "--op", "zero", "--out", "b"]]
