"""Every command of ``clipheads`` refuses bad input with exit code 2 and one message, never a traceback.

The commands are walked from the typer app (sub-apps such as ``world`` and ``captioner`` included), so a new command
is covered without editing this file; its options are matched against catalogues of bad inputs keyed by option name.
Two kinds of refusal, each used for one kind of input:

* a value outside its option's domain (a number, a device, an input path that does not exist) is refused while the
  command line is parsed, before anything is loaded: click's usage error, printed by ``clipheads.cli.main`` as one
  line, ``error: Invalid value for '--option': ... (see 'clipheads CMD --help')``;
* a file whose content is bad (a mask, a dataset, a CCS file) is refused when it is read: one ``error: ...`` line
  (a :class:`~clipheads.errors.ClipHeadsError` printed by ``clipheads.cli.main``).

Output paths are checked by another part of the CLI and are not in these catalogues.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import get_args

import pytest
import torch
import typer

import clipheads.cli as cli

ROOT = typer.main.get_command(cli.app)


def _commands(group=ROOT, path: tuple[str, ...] = ()):
    for name, command in sorted(group.commands.items()):
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


COMMANDS = dict(_commands())


def _kind(param) -> str | None:
    """'int', 'float', 'path', 'str', 'bool' or None: what the option parses, from its annotation (typer) or its
    click type (older typer)."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:
        annotation = descriptor.annotation
        types = set(get_args(annotation)) - {type(None)} or {annotation}
        if len(types) == 1:
            (only,) = types
            if only is list or str(only).startswith("list"):
                only = get_args(only)[0] if get_args(only) else only
            return {int: "int", float: "float", Path: "path", str: "str", bool: "bool"}.get(only)
        return None
    name = getattr(getattr(param, "type", None), "name", "")
    return {"integer": "int", "integer range": "int", "float": "float", "float range": "float", "path": "path",
            "text": "str", "boolean": "bool"}.get(name)


def _options(command):
    return {p.opts[0]: p for p in command.params if p.opts and p.opts[0].startswith("--")}


# ------------------------------------------------------------------------------------------------- catalogues
# A value each option must refuse. Integer options missing here are refused at their declared minimum minus one;
# an integer option with neither fails test_every_number_option_has_a_domain.
BAD_INTS = {"--seed": "-1", "--batch-size": "0", "--num-workers": "-1", "--k": "0", "--top-k": "0",
            "--checkpoint-every": "0", "--verify-top": "0", "--order": "3", "--probes": "0", "--population": "1",
            "--generations": "0", "--elitism": "-1", "--epochs": "-1", "--max-heads": "0", "--candidates": "0",
            "--rank": "0", "--bp-epochs": "-1", "--max-images": "0", "--top": "-1", "--seeds": "-1",
            "--skew-k": "0", "--steps": "0", "--eval-images": "0", "--width": "0", "--layers": "0"}
# Every float option refuses these; some also refuse values of their own.
NON_FINITE = ["nan", "inf", "-inf"]
BAD_FLOATS = {"--gate": ["2", "-0.5"], "--crossover": ["1.5"], "--mutation": ["-0.1"], "--lr": ["0", "-1e-3"],
              "--full-lr": ["0"], "--bp-lr": ["0"], "--llm-timeout": ["0", "-1"]}
BAD_DEVICES = ["gpu0", "foo", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"]) + (
    [] if torch.backends.mps.is_available() else ["mps"])
# Files whose content is bad, by the input option that reads them (written by the `files` fixture).
BAD_FILES = {"--data": ["broken.json"], "--mask": ["broken.json", "mask_architecture.json", "mask_means_list.json",
                                                   "mask_means_nan.json", "mask_gate_2.json"],
             "--ccs": ["broken.json"], "--descriptions": ["broken.json"]}


def _min(param):
    return getattr(param, "min", None) if hasattr(param, "min") else getattr(getattr(param, "type", None), "min", None)


def _bad_numbers(name: str, param) -> list[str]:
    kind = _kind(param)
    if kind == "float":
        return NON_FINITE + BAD_FLOATS.get(name, [])
    if kind == "int":
        if name in BAD_INTS:
            return [BAD_INTS[name]]
        return [] if _min(param) is None else [str(_min(param) - 1)]
    return []


def _cases(catalogue) -> list:
    cases = []
    for path, command in COMMANDS.items():
        for name, param in _options(command).items():
            cases += [pytest.param(path, name, value, id=f"{' '.join(path)} {name} {value}")
                      for value in catalogue(name, param)]
    return cases


NUMBER_CASES = _cases(_bad_numbers)
DEVICE_CASES = _cases(lambda name, param: BAD_DEVICES if name == "--device" else [])
FILE_CASES = _cases(lambda name, param: BAD_FILES.get(name, []) if _kind(param) == "path" else [])


# ------------------------------------------------------------------------------------------------------ running
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Input files: an empty JSON object (a placeholder that exists), broken JSON and malformed masks."""
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "input.json").write_text("{}")
    (root / "broken.json").write_text('{"images": [{"filename": "0.png", "sentences"')
    gates = [[1.0, 0.0], [1.0, 1.0]]
    mask = {"format": "clipheads.HeadMask/1", "n_layers": 2, "n_heads": 2, "gates": gates, "ablated": ["L0.H1"]}
    (root / "mask_architecture.json").write_text(json.dumps({**mask, "architecture": "ViT-B/32"}))
    (root / "mask_means_list.json").write_text(json.dumps({**mask, "means": [0.1, 0.2]}))
    (root / "mask_means_nan.json").write_text(json.dumps({**mask, "means": {"L0.H1": [float("nan"), 0.0]}}))
    (root / "mask_gate_2.json").write_text(json.dumps({**mask, "gates": [[1.0, 2.0], [1.0, 1.0]]}))
    return root


@pytest.fixture(autouse=True)
def _restore_logging():
    """``main`` quiets the root logger and transformers for the terminal; give other tests their logging back."""
    import transformers

    level, verbosity = logging.getLogger().level, transformers.utils.logging.get_verbosity()
    yield
    logging.getLogger().setLevel(level)
    transformers.utils.logging.set_verbosity(verbosity)
    transformers.utils.logging.enable_progress_bar()


def run(argv, monkeypatch, capsys) -> tuple[int, str, str]:
    """``clipheads ARGV`` as the console script runs it (``clipheads.cli.main``): exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["clipheads", *map(str, argv)])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def _fill(command, given: str, files: Path, tmp_path: Path) -> list[str]:
    """Values for the command's other required options (placeholders: parsing stops at the bad one)."""
    args = []
    for name, param in _options(command).items():
        if not param.required or name == given:
            continue
        kind = _kind(param)
        value = tmp_path / "out" if name == "--out" else files / "input.json" if kind == "path" else (
            "retrieval" if name == "--task" else "x")
        args += [name, value]
    return args


def assert_usage_error(code, out: str, err: str, option: str) -> None:
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith(f"error: Invalid value for '{option}'"), err


def assert_error_line(code, out: str, err: str) -> str:
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 2, (out, err)
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


# ------------------------------------------------------------------------------------------------------- tests
def test_the_walk_finds_every_command():
    assert {"info", "mask", "eval", "scan", "layers", "search", "finetune", "describe", "ccs", "prune", "demo",
            "world make", "world train", "captioner train", "captioner generate"} <= {" ".join(p) for p in COMMANDS}
    assert len(NUMBER_CASES) > 100 and len(DEVICE_CASES) >= 3 * 12 and len(FILE_CASES) >= 12


def test_every_number_option_has_a_domain():
    """A new integer option needs a declared minimum (typer's ``min=``) or an entry in BAD_INTS; a new float option
    is caught by NON_FINITE unless it checks its values (``clipheads.cli.options.finite``)."""
    missing = [f"{' '.join(path)} {name}" for path, command in COMMANDS.items()
               for name, param in _options(command).items() if _kind(param) == "int" and not _bad_numbers(name, param)]
    assert not missing, f"integer options without a domain: {missing}"


@pytest.mark.parametrize(("path", "option", "value"), NUMBER_CASES)
def test_numbers_outside_their_domain_are_refused_at_parse_time(path, option, value, files, tmp_path, monkeypatch,
                                                                capsys):
    command = COMMANDS[path]
    args = [*path, f"{option}={value}", *_fill(command, option, files, tmp_path)]
    assert_usage_error(*run(args, monkeypatch, capsys), option)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("path", "option", "value"), DEVICE_CASES)
def test_devices_this_machine_lacks_are_refused_at_parse_time(path, option, value, files, tmp_path, monkeypatch,
                                                              capsys):
    args = [*path, option, value, *_fill(COMMANDS[path], option, files, tmp_path)]
    code, out, err = run(args, monkeypatch, capsys)
    assert_usage_error(code, out, err, option)
    assert value in err


@pytest.mark.parametrize(("path", "option", "value"), _cases(
    lambda name, param: ["missing.json"] if _kind(param) == "path" and name != "--out" and (
        getattr(getattr(param, "type_descriptor", None), "parameter_info", None) is None
        or param.type_descriptor.parameter_info.exists) else []))
def test_input_paths_that_do_not_exist_are_refused_at_parse_time(path, option, value, files, tmp_path, monkeypatch,
                                                                 capsys):
    args = [*path, option, tmp_path / value, *_fill(COMMANDS[path], option, files, tmp_path)]
    code, out, err = run(args, monkeypatch, capsys)
    assert_usage_error(code, out, err, option)
    assert "does not exist" in err


# inputs that are not only paths, so that existence is checked by their reader: shard patterns
# ("shards/{000..009}.tar") and preset names ("--templates openai", in every command that takes templates)
NOT_ONLY_PATHS = {(("eval",), "--data")} | {(path, "--templates") for path in COMMANDS}


def test_every_input_path_must_exist():
    """Options that read a file or folder check that it exists while parsing (typer's ``exists=True``)."""
    readers = [f"{' '.join(path)} {name}" for path, command in COMMANDS.items()
               for name, param in _options(command).items()
               if _kind(param) == "path" and name not in ("--out", "--cache-dir")
               and (path, name) not in NOT_ONLY_PATHS and not param.type_descriptor.parameter_info.exists]
    assert not readers, f"input paths not checked at parse time: {readers}"


@pytest.mark.parametrize(("path", "option", "value"), FILE_CASES)
def test_malformed_files_are_one_error_line(path, option, value, files, tmp_path, monkeypatch, capsys):
    args = [*path, option, files / value, *_fill(COMMANDS[path], option, files, tmp_path)]
    if path == ("ccs",) and option == "--descriptions":
        args += ["--judge", "clip"]
    line = assert_error_line(*run(args, monkeypatch, capsys))
    assert value in line  # the message names the file


# ------------------------------------------------------------------------------------ the examples of issue 16
EXAMPLES = [("mask", "--gate", "2"), ("mask", "--gate", "nan"), ("eval", "--alpha", "nan"), ("search", "--beta", "inf"),
            ("scan", "--num-workers", "-1"), ("scan", "--checkpoint-every", "0"), ("finetune", "--epochs", "0"),
            ("search", "--lr", "nan"), ("describe", "--max-images", "0"), ("finetune", "--rank", "0"),
            ("prune", "--top", "-1"), ("prune", "--seeds", "-1"), ("ccs", "--llm-timeout", "0")]


@pytest.mark.parametrize(("command", "option", "value"), EXAMPLES, ids=[" ".join(e) for e in EXAMPLES])
def test_the_issue_examples_are_refused(command, option, value, files, tmp_path, monkeypatch, capsys):
    args = [command, option, value, *_fill(COMMANDS[(command,)], option, files, tmp_path)]
    if command == "mask":
        args += ["--heads", "L0.H0"]
    code, out, err = run(args, monkeypatch, capsys)
    assert_usage_error(code, out, err, option)
    assert list(tmp_path.iterdir()) == []  # nothing written (mask --gate 2 used to write a no-op mask)


@pytest.mark.parametrize("device", ["cuda", "cuda:9", "mps", "foo", "gpu0"])
def test_the_device_examples(device, monkeypatch, capsys):
    import clipheads
    from clipheads.errors import DeviceError

    if device.startswith("cuda") and torch.cuda.device_count() > int(device.partition(":")[2] or 0):
        pytest.skip(f"this machine has {device}")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has mps")
    code, out, err = run(["info", "--device", device], monkeypatch, capsys)
    assert_usage_error(code, out, err, "--device")
    with pytest.raises(DeviceError, match=f"'{device}'"):  # the Python API checks the same way, before loading
        clipheads.load("bundled", device=device)


def test_the_cpu_device_is_accepted(monkeypatch, capsys):
    code, out, _ = run(["info", "--device", "cpu"], monkeypatch, capsys)
    assert code == 0 and "heads per layer" in out


def test_a_damaged_search_folder_is_one_error_line(tmp_path, monkeypatch, capsys):
    """A scan folder whose state.json was truncated by something else: one line naming it, on resume."""
    import numpy as np
    from PIL import Image

    from clipheads.models.random_init import random_hf_clip, save_hf

    save_hf(random_hf_clip("tiny", seed=3), tmp_path / "model")
    rng = np.random.default_rng(0)
    images = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        images.append({"filename": f"{i}.png", "split": "val", "sentences": [{"raw": f"picture {i}"}]})
    (tmp_path / "data.json").write_text(json.dumps({"images": images}))
    args = ["scan", "--model", tmp_path / "model", "--data", tmp_path / "data.json", "--report-split", "none",
            "--out", tmp_path / "scan"]
    code, out, err = run(args, monkeypatch, capsys)
    assert code == 0, err
    state = tmp_path / "scan" / "state.json"
    state.write_text(state.read_text()[:20])
    line = assert_error_line(*run(args, monkeypatch, capsys))
    assert f"{state} is damaged (not valid JSON" in line and "delete it to restart" in line


# ------------------------------------------------------------------------------------------------- one meaning
def _visible_options():
    """(command path, longest spelling, click parameter) of every option ``--help`` shows."""
    return [(" ".join(path), max(p.opts, key=len), p) for path, command in COMMANDS.items() for p in command.params
            if p.param_type_name == "option" and not p.hidden]


def test_every_option_has_help():
    missing = [f"{path} {name}" for path, name, p in _visible_options() if not (p.help or "").strip()]
    assert not missing, missing


def test_options_of_the_same_name_parse_the_same_type():
    kinds: dict[str, dict[str, str | None]] = {}
    for path, name, p in _visible_options():
        kinds.setdefault(name, {})[path] = _kind(p)
    clashes = {name: by_command for name, by_command in kinds.items() if len(set(by_command.values())) > 1}
    assert not clashes, clashes


@pytest.mark.parametrize("name", ["--k", "--rank", "--skew-k", "--lora-rank", "--image-root", "--precision",
                                  "--no-report"])
def test_renamed_options_have_one_meaning(name):
    """--k is texts per head, --rank principal directions, --skew-k MaxSkew's K, --lora-rank a LoRA rank, --precision
    open_clip's precision, --no-report no held-out report; the old
    spellings (eval --k, finetune --rank, captioner --images-root/--layers, prune --retrieval) are hidden aliases."""
    found = [(p.help, p.default, _kind(p)) for _, spelled, p in _visible_options() if spelled == name]
    assert found and len(set(found)) == 1, found


def test_old_spellings_are_hidden_aliases():
    old = {("eval",): "--k", ("finetune",): "--rank", ("captioner", "train"): "--images-root",
           ("prune",): "--retrieval"}
    for path, spelling in old.items():
        params = [p for p in COMMANDS[path].params if spelling in p.opts]
        assert len(params) == 1 and params[0].hidden and "Old spelling of" in params[0].help, (path, spelling)


def test_the_top_help_maps_every_command_to_a_line_of_work():
    words = set(re.findall(r"[a-z]+", ROOT.help.split("The three lines of work", 1)[1]))
    assert {"scan", "search", "layers", "describe", "ccs", "prune"} <= words
    assert set(ROOT.commands) <= words, set(ROOT.commands) - words


def test_options_of_the_same_name_share_type_default_and_help():
    """One meaning per option (issue 22): every visible option of a name has the same spellings, type, default and
    help in every command. Hidden old spellings, kept for one release, are left out (``--threshold`` is search's old
    ``--gate-threshold`` and ccs's judge threshold)."""
    meanings: dict[str, dict[tuple, list[str]]] = {}
    for path, name, p in _visible_options():
        meaning = (tuple(sorted(p.opts)), _kind(p), repr(p.default), p.help)
        meanings.setdefault(name, {}).setdefault(meaning, []).append(path)
    differ = {name: by_meaning for name, by_meaning in meanings.items() if len(by_meaning) > 1}
    assert not differ, differ


def _parsed(path: tuple[str, ...], *args) -> dict:
    """The values a command receives for ``args`` (what typer's callbacks make of them), without running it."""
    import click

    ctx = click.Context(ROOT, info_name="clipheads")
    group = ROOT
    for name in path[:-1]:
        group = group.commands[name]
        ctx = click.Context(group, info_name=name, parent=ctx)
    command = group.commands[path[-1]]
    with command.make_context(path[-1], [str(a) for a in args], parent=ctx) as sub:
        return sub.params


def test_defaults_that_depend_on_the_command(tmp_path):
    """An option whose default depends on the command has the default None, and its help states the rule that
    :func:`clipheads.cli.options.per_command` applies (the values the commands had before issue 22)."""
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    scan = _parsed(("scan",), "--data", image)
    assert (scan["out"], scan["batch_size"], scan["task"], scan["model"], scan["op"], scan["alpha"]) == (
        Path("clipheads-scan"), 64, "retrieval", "bundled", "identity", None)
    world = _parsed(("world", "train"), "--data", tmp_path)
    assert (world["out"], world["batch_size"], world["lr"]) == (Path("clipheads-world-train"), 128, 1e-3)
    prune = _parsed(("prune",), "--ccs", image)
    assert (prune["out"], prune["op"], prune["alpha"], prune["batch_size"], prune["split"]) == (
        Path("clipheads-prune"), "scale", 0.0, 32, None)
    evaluation = _parsed(("eval",), "--task", "retrieval")
    assert (evaluation["out"], evaluation["split"], evaluation["batch_size"]) == (Path("clipheads-eval.json"), "test",
                                                                                 64)
    generate = _parsed(("captioner", "generate"), "--captioner", tmp_path, "--images", image)
    assert (generate["model"], generate["out"], generate["batch_size"]) == (None, None, 32)  # the captioner's model
    assert _parsed(("layers",), "--data", image)["split"] == "none"
    assert _parsed(("captioner", "train"), "--data", image)["epochs"] == 10
    assert _parsed(("finetune",), "--data", image)["epochs"] == 3
    assert _parsed(("search",), "--data", image)["epochs"] is None  # bp's own default
    assert (_parsed(("atlas",), "--data", image)["max_images"], _parsed(("ccs",))["max_images"]) == (200, 2000)
    given = _parsed(("scan",), "--data", image, "--out", tmp_path / "o", "--batch-size", 3, "--model", "m")
    assert (given["out"], given["batch_size"], given["model"]) == (tmp_path / "o", 3, "m")


@pytest.mark.parametrize(("path", "option", "value"), [(("world", "train"), "--batch-size", "1"),
                                                       (("finetune",), "--batch-size", "1"),
                                                       (("finetune",), "--epochs", "0"),
                                                       (("captioner", "train"), "--epochs", "0")])
def test_minimums_that_depend_on_the_command(path, option, value, files, tmp_path, monkeypatch, capsys):
    """A contrastive batch needs two pairs; training needs an epoch (search's bp takes --epochs 0)."""
    args = [*path, option, value, *_fill(COMMANDS[path], option, files, tmp_path)]
    line = assert_error_line(*run(args, monkeypatch, capsys))
    assert option in line and "needs at least" in line


def test_renamed_in_issue_22_are_hidden_aliases():
    """scan --method (exact/attribution) is --scoring, search --threshold (bp's gate) --gate-threshold, atlas --top
    --images-per-head: --method, --threshold and --top keep one meaning (finetune's, ccs's, prune's)."""
    old = {("scan",): "--method", ("search",): "--threshold", ("atlas",): "--top"}
    for path, spelling in old.items():
        params = [p for p in COMMANDS[path].params if spelling in p.opts]
        assert len(params) == 1 and params[0].hidden and "Old spelling of" in params[0].help, (path, spelling)
    assert _parsed(("scan",), "--data", __file__, "--method", "attribution")["method_old"] == "attribution"
