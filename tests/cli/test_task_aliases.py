"""``--task`` takes clip_benchmark's task names on every command with a task option, through one parser
(``clipheads.eval.benchmark.task_name`` behind ``--task``'s callback, ``options._task``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipheads.errors import ClipHeadsError

ALIASES = [("zeroshot_retrieval", "retrieval"), ("zeroshot_classification", "zeroshot"),
           ("image_caption_selection", "selection"), ("retrieval", "retrieval")]


@pytest.mark.parametrize("command", ["scan", "search", "layers"])
@pytest.mark.parametrize(("given", "task"), ALIASES)
def test_search_commands_read_clip_benchmark_task_names(command, given, task, run_main, monkeypatch, tmp_path: Path):
    from clipheads.cli import search_cmd

    class Stop(search_cmd._Run):
        def __init__(self, model, device, precision, task, *args, **kwargs):
            raise ClipHeadsError(f"task seen: {task}")

    monkeypatch.setattr(search_cmd, "_Run", Stop)
    (tmp_path / "data.json").write_text("[]")
    code, _, err = run_main(command, "--task", given, "--data", tmp_path / "data.json", "--out", tmp_path / "out",
                            forbid_load=True)
    assert code == 2 and f"task seen: {task}" in err, err


@pytest.mark.parametrize(("command", "task"), [("scan", "bias"), ("search", "compositional"), ("eval", "nope")])
def test_a_task_the_command_lacks_is_a_usage_error_naming_the_aliases(command, task, run_main, tmp_path: Path):
    (tmp_path / "data.json").write_text("[]")
    code, _, err = run_main(command, "--task", task, "--data", tmp_path / "data.json", forbid_load=True)
    assert code == 2 and "--task" in err and f"unknown task {task!r}" in err and "zeroshot_classification" in err


def test_eval_reads_the_alias_before_its_data(run_main, tmp_path: Path):
    """eval's refusal of a bad --data names the task the alias stands for."""
    (tmp_path / "data.json").write_text("[]")
    code, _, err = run_main("eval", "--task", "zeroshot_classification", "--data", tmp_path / "data.json",
                            "--out", tmp_path / "r.json", forbid_load=True)
    assert code == 2 and "--task zeroshot" in err, err
