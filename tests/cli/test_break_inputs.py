"""Inputs of the kinds issues 16 and 17 list, but not the examples they named (found by trying to break the CLI):
each is refused with one ``error:`` line and exit code 2, before any work, never a traceback."""

from __future__ import annotations

import json

import pytest

from clipheads.runtime import available_cores


def test_zeroshot_given_a_json_file_is_one_line(tmp_path, run_main):
    """A JSON file read as a CSV table (``--task zeroshot --data retrieval.json``): its rows have more cells than
    its header, which ``csv.DictReader`` hides under the key None (a list): it was an AttributeError."""
    data = tmp_path / "retrieval.json"
    data.write_text(json.dumps({"images": [{"filename": "a.png", "sentences": [{"raw": "a cat"}]}]}, indent=1))
    code, out, err = run_main("eval", "--task", "zeroshot", "--data", data, "--out", tmp_path / "e.json")
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1 and "fields but the header has" in err
    assert not (tmp_path / "e.json").exists()


def test_csv_row_longer_than_its_header_is_one_line(tmp_path):
    from clipheads.data.io import read_table
    from clipheads.errors import DataError

    table = tmp_path / "t.csv"
    table.write_text("image,caption\na.png,a cat, sitting\n")
    with pytest.raises(DataError, match="line 2: 3 fields but the header has 2"):
        read_table(table)


def test_threads_above_the_cores_is_one_line(tmp_path, run_main):
    """``--threads 100000`` started 100000 torch threads: loading the model then failed with 'unable to mmap ...:
    Cannot allocate memory' (a wrong message), and the next command of the same process too."""
    import torch

    before = torch.get_num_threads()
    try:
        code, _, err = run_main("eval", "--task", "retrieval", "--data", tmp_path, "--out", tmp_path / "e.json",
                                "--threads", available_cores() + 1, forbid_load=True)
    finally:
        torch.set_num_threads(before)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert f"is more than the {available_cores()} cores" in err
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("sweep", ["0.1,nan", "inf", "0,-inf"])
def test_beta_sweep_refuses_non_finite_betas_before_work(tmp_path, run_main, sweep):
    """``--beta-sweep 0.1,nan`` (``--beta nan`` is refused at parse) wrote a run folder, scanned every head, then
    ended in a ValueError traceback while writing the nan fitness as JSON."""
    code, _, err = run_main("search", "--data", tmp_path, "--beta-sweep", sweep, "--out", tmp_path / "s",
                            forbid_load=True)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert "--beta-sweep takes finite numbers" in err
    assert not (tmp_path / "s").exists()


def test_a_dataset_of_another_task_names_the_task_it_was_read_as(tmp_path, run_main):
    """``clipheads layers --data retrieval.json`` (layers' default task is selection, scan's is retrieval) said only
    "item 0 needs 'image', 'candidates' and 'answer'", not that the file was read as a caption-selection dataset."""
    data = tmp_path / "retrieval.json"
    data.write_text(json.dumps({"images": [{"filename": "a.png", "split": "val", "sentences": [{"raw": "a cat"}]}]}))
    code, _, err = run_main("layers", "--data", data, "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "item 0: field 'image': field required (read as a selection dataset: --task selection)" in err


def test_means_from_a_file_says_it_is_a_file(tmp_path, run_main):
    """``mask --means-from retrieval.json`` said "no images (.png/.jpg/...) found under 'retrieval.json'"."""
    data = tmp_path / "retrieval.json"
    data.write_text("{}")
    code, _, err = run_main("mask", "--out", tmp_path / "m.json", "--heads", "L0.H1", "--means-from", data)
    assert code == 2 and err.count("\n") == 1 and "is a file; give a folder of reference images" in err
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("target", ["data", "mask", "data-by-symlink"])
def test_eval_never_writes_its_result_over_an_input(tmp_path, run_main, target):
    """``eval --data w/retrieval.json --out w/retrieval.json`` replaced the dataset by its result (rc 0): the output
    is checked against the command's own input files, also when it reaches one through a symlink."""
    data = tmp_path / "retrieval.json"
    data.write_text(json.dumps({"images": [{"filename": "a.png", "split": "val", "sentences": [{"raw": "a cat"}]}]}))
    mask = tmp_path / "mask.json"
    mask.write_text(json.dumps({"ablated": ["L0.H1"]}))
    out = {"data": data, "mask": mask, "data-by-symlink": tmp_path / "link.json"}[target]
    if target == "data-by-symlink":
        out.symlink_to(data)
    before = {p: p.read_bytes() for p in (data, mask)}
    code, _, err = run_main("eval", "--task", "retrieval", "--data", data, "--mask", mask, "--out", out,
                            forbid_load=True)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"is the input file of --{'mask' if target == 'mask' else 'data'}" in err
    assert {p: p.read_bytes() for p in (data, mask)} == before
