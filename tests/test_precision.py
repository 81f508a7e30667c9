"""``clipheads.precision``: open_clip's precision names, one parser, read the same by ``load``, ``EncodeOptions`` and
the results files (``run_meta``)."""

from __future__ import annotations

import pytest
import torch

import clipheads
from clipheads.errors import ClipHeadsError, ModelLoadError
from clipheads.eval import EncodeOptions, encode_texts
from clipheads.precision import NAMES, PRECISIONS, current_precision, parse_precision, use_precision
from clipheads.runtime import run_meta

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.mark.parametrize(("name", "weights", "autocast", "input_dtype"), [
    ("fp32", F32, None, None), ("amp", F32, F16, None), ("amp_bf16", F32, BF16, None),
    ("amp_bfloat16", F32, BF16, None), ("fp16", F16, None, F16), ("bf16", BF16, None, BF16),
    ("pure_fp16", F16, None, F16), ("pure_bf16", BF16, None, BF16)])
def test_open_clips_names_mean_what_open_clip_means(name, weights, autocast, input_dtype):
    import open_clip
    from open_clip_train.precision import get_autocast

    precision = parse_precision(name)
    assert (precision.weights, precision.autocast_dtype, precision.input) == (weights, autocast, input_dtype)
    assert precision.input == open_clip.get_input_dtype(name)  # the library's own reading
    amp = get_autocast(name, device_type="cpu")
    with amp():
        library = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    with precision.autocast("cpu"):
        ours = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    assert ours == library == autocast


def test_the_parser_canonicalises_and_refuses_unknown_names_in_one_line():
    assert parse_precision(None).name == "fp32" and parse_precision(" AMP_BFLOAT16 ").name == "amp_bf16"
    assert parse_precision(PRECISIONS["bf16"]) is PRECISIONS["bf16"]
    assert set(NAMES) == {"fp32", "amp", "amp_bf16", "amp_bfloat16", "fp16", "bf16", "pure_fp16", "pure_bf16"}
    for bad in ("int8", "float16", "", "amp-bf16"):
        with pytest.raises(ClipHeadsError, match="unknown precision") as info:
            parse_precision(bad)
        assert "\n" not in str(info.value) and "amp_bf16" in str(info.value)
    assert parse_precision("amp_bf16").to_dict() == {"name": "amp_bf16", "weights": "float32", "autocast": "bfloat16",
                                                     "input": "float32"}


def test_use_precision_autocasts_and_is_recorded_only_while_inside():
    assert current_precision() is None and "precision" not in run_meta()
    with use_precision("amp_bfloat16", "cpu") as precision:
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == BF16
        assert current_precision() is precision and run_meta()["precision"]["name"] == "amp_bf16"
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == BF16
    assert not torch.is_autocast_enabled("cpu") and current_precision() is None and "precision" not in run_meta()
    with use_precision("bf16", "cpu"):  # weights in bf16: no autocast
        assert not torch.is_autocast_enabled("cpu") and run_meta()["precision"]["weights"] == "bfloat16"


def test_load_holds_the_weights_in_the_precisions_dtype(tmp_path):
    assert clipheads.load("bundled", dtype="amp_bf16").dtype == F32
    assert clipheads.load("bundled", dtype="pure_bf16").dtype == BF16
    assert clipheads.load("bundled", dtype="bf16").dtype == BF16
    with pytest.raises(ModelLoadError, match="unknown dtype 'int8'"):
        clipheads.load("bundled", dtype="int8")


def test_encode_options_take_the_same_names(tiny_hf):
    assert EncodeOptions(precision="amp_bfloat16").precision == "amp_bf16"
    with pytest.raises(ClipHeadsError, match="unknown precision"):
        EncodeOptions(precision="int4")
    # bf16 means bf16 weights (open_clip): an fp32 model is refused, naming the autocast spelling
    with pytest.raises(ClipHeadsError, match="amp_bf16 for autocast"):
        encode_texts(tiny_hf, ["a red square"], precision="bf16")
