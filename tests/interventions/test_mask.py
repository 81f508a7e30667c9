"""HeadMask: builders, labels, JSON round-trip and clear refusals."""

from __future__ import annotations

import json

import pytest
import torch

import clipheads
from clipheads import HeadMask
from clipheads.heads import parse_head, parse_heads, parse_layer_ranges, parse_layers


def test_head_labels_parse_in_every_accepted_form():
    assert parse_head("L3.H7") == (3, 7)
    assert parse_head("l3h7") == (3, 7)
    assert parse_head("3.7") == (3, 7)
    assert parse_head((3, 7)) == (3, 7)
    assert parse_heads("L0.H1, L2.H3 L0.H1") == [(0, 1), (2, 3)]
    assert parse_layers("0-2,5") == [0, 1, 2, 5]
    assert parse_layer_ranges("0-2,3-5") == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("bad", ["H3", "L3", "L3.Hx", "37", ""])
def test_bad_head_labels_are_refused(bad):
    with pytest.raises(clipheads.MaskError):
        parse_heads(bad) if bad else parse_head(bad)


def test_builders_and_queries():
    mask = HeadMask.from_heads("L1.H2,L3.H0", (4, 3))
    assert mask.ablated == ["L1.H2", "L3.H0"] and mask.n_ablated == 2 and mask.layers == [1, 3]
    assert "L1.H2" in mask and "L0.H0" not in mask
    layers = HeadMask.from_layers("1-2", (4, 3))
    assert layers.heads_per_layer() == [0, 3, 3, 0]
    assert HeadMask.from_tensor(torch.ones(4, 3)).is_identity()


def test_layers_past_the_model_are_refused_with_the_layer_count():
    with pytest.raises(clipheads.MaskError, match=r"'0-9' go past the last layer: the model has 4 layers, 0\.\.3"):
        parse_layer_ranges("0-1,0-9", n_layers=4)
    with pytest.raises(clipheads.MaskError, match="has 4 layers"):
        HeadMask.from_layers([4], (4, 3))


def test_json_round_trip_records_the_architecture(tiny_hf, tmp_path):
    mask = HeadMask.from_heads("L0.H3", tiny_hf)
    mask.gates[1, 1] = 0.5
    path = mask.save(tmp_path / "mask.json")
    data = json.loads(path.read_text())
    assert data["ablated"] == ["L0.H3", "L1.H1"] and data["architecture"]["n_heads"] == tiny_hf.n_heads
    assert HeadMask.load(path) == mask
    assert HeadMask.load(path).architecture == tiny_hf.architecture


def test_wrong_shape_is_refused(tiny_hf):
    with pytest.raises(clipheads.MaskError, match="does not fit"):
        clipheads.apply(tiny_hf, HeadMask.ones((12, 12)))
    with pytest.raises(clipheads.MaskError, match="does not exist"):
        HeadMask.from_heads("L7.H0", tiny_hf)
    with pytest.raises(clipheads.MaskError):
        HeadMask(torch.ones(3))


def test_bad_mask_files_are_refused(tmp_path):
    with pytest.raises(clipheads.MaskError, match="does not exist"):
        HeadMask.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(clipheads.MaskError, match="not valid JSON"):
        HeadMask.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    with pytest.raises(clipheads.MaskError, match="not a clipheads head mask"):
        HeadMask.load(tmp_path / "other.json")


def test_operator_errors(tiny_hf):
    mask = HeadMask.from_heads("L0.H0", tiny_hf)
    with pytest.raises(clipheads.OperatorError, match="unknown operator"):
        clipheads.apply(tiny_hf, mask, op="nope")
    with pytest.raises(clipheads.OperatorError, match="needs head means"):
        clipheads.apply(tiny_hf, mask, op="mean")
    with pytest.raises(clipheads.OperatorError, match="do not fit"):
        clipheads.apply(tiny_hf, mask, op="mean", means=torch.zeros(2, 4, 3))
    assert tiny_hf.intervention is None and tiny_hf.hooked_layers == []


def test_load_with_the_model_checks_the_architecture(tiny_hf, tmp_path):
    path = HeadMask.from_heads("L1.H2", tiny_hf).save(tmp_path / "mask.json")
    assert HeadMask.load(path, tiny_hf).ablated == ["L1.H2"]
    assert HeadMask.load(path, tiny_hf.architecture) == HeadMask.load(path)
    bundled = clipheads.load("bundled")
    with pytest.raises(clipheads.MaskError, match="mask.json: mask of shape 2 layers x 4 heads .* 6 layers x 8 heads"):
        HeadMask.load(path, bundled)
