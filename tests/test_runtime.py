"""Threads: one option for every long command, a default of one thread, the count recorded in results files."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import clipheads
from clipheads.cli import app
from clipheads.errors import ClipHeadsError
from clipheads.runtime import available_cores, resolve_threads, run_meta, set_threads
from clipheads.search.state import RunFolder


@pytest.fixture()
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_resolve_threads_default_env_and_auto(monkeypatch):
    monkeypatch.delenv("CLIPHEADS_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert resolve_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads() == 3
    monkeypatch.setenv("CLIPHEADS_THREADS", "auto")  # ours wins over OpenMP's
    assert resolve_threads() == available_cores()
    assert resolve_threads(2) == 2 and resolve_threads(0) == available_cores() == resolve_threads("auto")
    monkeypatch.setenv("CLIPHEADS_THREADS", "many")
    with pytest.raises(ClipHeadsError, match="CLIPHEADS_THREADS must be a number"):
        resolve_threads()
    with pytest.raises(ClipHeadsError, match="--threads must be 0"):
        resolve_threads(-1)


def test_set_threads_and_run_meta(keep_threads):
    torch.set_num_threads(2)
    assert set_threads(1) == 1 == torch.get_num_threads()
    meta = run_meta()
    assert meta["threads"] == 1 and meta["cores_available"] == available_cores()
    assert meta["clipheads"] == clipheads.__version__ and meta["torch"] == torch.__version__


def test_cli_threads_option_is_applied_before_the_command(tmp_path, keep_threads, monkeypatch):
    monkeypatch.delenv("CLIPHEADS_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    runner = CliRunner()
    torch.set_num_threads(1)
    (tmp_path / "empty").mkdir()  # an image folder without images: parsing succeeds, the command fails
    result = runner.invoke(app, ["describe", "--data", str(tmp_path / "empty"), "--threads", "2"])
    assert result.exit_code != 0 and torch.get_num_threads() == 2  # set while parsing, before the command failed
    result = runner.invoke(app, ["describe", "--data", str(tmp_path / "empty")])
    assert torch.get_num_threads() == 1  # the default
    result = runner.invoke(app, ["scan", "--data", str(tmp_path), "--threads", "-1"])
    assert result.exit_code == 2 and "--threads" in result.output


@pytest.mark.parametrize("command", ["demo", "scan", "layers", "search", "eval", "describe", "ccs", "prune",
                                     "finetune", "world make", "world train", "captioner train",
                                     "captioner generate"])
def test_every_long_command_has_threads(command):
    result = CliRunner().invoke(app, [*command.split(), "--help"], terminal_width=200)
    assert result.exit_code == 0 and "--threads" in result.output


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"clipheads {clipheads.__version__}"


def test_search_results_record_threads(tmp_path, keep_threads):
    set_threads(1)
    folder = RunFolder(tmp_path / "run", {"strategy": "ga"})
    folder.write_json("summary.json", {"metric": 0.5})
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["metric"] == 0.5 and written["run"]["threads"] == 1
