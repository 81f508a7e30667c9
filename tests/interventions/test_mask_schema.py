"""Mask files with fields of the wrong type or non-finite values are one MaskError line; so are non-finite tensors."""

from __future__ import annotations

import json

import pytest
import torch
import typer

from clipheads import HeadMask, MaskError, Operator, OperatorError
from clipheads.cli import app

GOOD = HeadMask.from_heads("L0.H1", (2, 3)).to_dict()
BAD = {
    "architecture of the wrong type": ({**GOOD, "architecture": "ViT-B/32"}, r"'architecture'"),
    "architecture missing a field": ({**GOOD, "architecture": {"n_layers": 2}}, r"'architecture.n_heads'"),
    "means of the wrong type": ({**GOOD, "means": [0.1, 0.2]}, r"'means'"),
    "a NaN mean": ({**GOOD, "means": {"L0.H1": [float("nan"), 0.0]}}, r"'means.L0.H1.0'.*finite"),
    "means of a head the mask lacks": ({**GOOD, "means": {"L7.H0": [0.0]}}, r"means of L7.H0"),
    "means of different lengths": ({**GOOD, "means": {"L0.H1": [0.0], "L1.H0": [0.0, 1.0]}}, "different lengths"),
    "a gate above 1": ({**GOOD, "gates": [[1, 2, 1], [1, 1, 1]]}, r"'gates.0.1'.*less than or equal to 1"),
    "a NaN gate": ({**GOOD, "gates": [[1, float("nan"), 1], [1, 1, 1]]}, r"'gates.0.1'.*finite"),
    "ragged gates": ({**GOOD, "gates": [[1, 1], [1]]}, "malformed gates"),
    "meta of the wrong type": ({**GOOD, "meta": ["x"]}, r"'meta'"),
    "ablated without a shape": ({"ablated": ["L0.H1"]}, "needs 'n_layers' and 'n_heads'"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_malformed_mask_files_are_one_line(tmp_path, case):
    data, message = BAD[case]
    path = tmp_path / "mask.json"
    path.write_text(json.dumps(data))  # json writes NaN as the NaN literal, which json.loads reads back
    with pytest.raises(MaskError, match=message) as info:
        HeadMask.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_good_mask_file_still_round_trips(tmp_path):
    mask = HeadMask.from_heads("L0.H1", (2, 3), value=0.25)
    mask.means = torch.randn(2, 3, 4)
    loaded = HeadMask.load(mask.save(tmp_path / "mask.json"))
    assert loaded == mask and torch.equal(loaded.means[0, 1], mask.means[0, 1])
    assert HeadMask.from_dict({"ablated": ["L1.H2"], "n_layers": 2, "n_heads": 3}).ablated == ["L1.H2"]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_from_tensor_refuses_non_finite_gates(value):
    gates = torch.ones(2, 3)
    gates[1, 2] = value
    with pytest.raises(MaskError, match="finite"):
        HeadMask.from_tensor(gates)
    with pytest.raises(MaskError, match="finite"):
        HeadMask.from_tensor(gates.requires_grad_(True))


def test_the_mean_operator_names_a_route_that_exists():
    with pytest.raises(OperatorError) as info:
        Operator("mean")
    assert "clipheads means" not in str(info.value)
    assert "clipheads mask --means-from" in str(info.value)
    mask_options = [o for p in typer.main.get_command(app).commands["mask"].params for o in p.opts]
    assert "--means-from" in mask_options
