"""A checkpoint damaged by something else (truncated, edited, wrong types) is one line naming it, never a traceback."""

from __future__ import annotations

import json

import pytest
import torch

from clipheads.search import GAConfig, GreedyConfig, MaskEvaluator, RunFolder, ga_search, greedy_search, scan_heads
from clipheads.search.bp import CHECKPOINT
from clipheads.search.state import DamagedStateError


@pytest.fixture()
def evaluator(planted_setup):
    backend, pixels, _, objective = planted_setup
    return MaskEvaluator(backend, pixels, objective, batch_size=16, split="val")


def _folder(tmp_path, state: str) -> RunFolder:
    folder = RunFolder(tmp_path / "out", {"strategy": "test"})
    (folder.path / "state.json").write_text(state)
    return folder


SCAN_DAMAGE = {
    "truncated": '{"scores": {"L0.H0": 0.5',
    "not an object": "[1, 2]",
    "scores of the wrong type": '{"scores": "all of them"}',
    "a score that is not a number": '{"scores": {"L0.H0": "high"}}',
    "a head the model does not have": '{"scores": {"L9.H9": 0.5}}',
}


@pytest.mark.parametrize("damage", SCAN_DAMAGE, ids=list(SCAN_DAMAGE))
def test_a_damaged_scan_state_is_one_line(evaluator, tmp_path, damage):
    folder = _folder(tmp_path, SCAN_DAMAGE[damage])
    with pytest.raises(DamagedStateError, match=r"state\.json is damaged \(.*\); delete it to restart") as info:
        scan_heads(evaluator, folder)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("state", [
    '{"generation": 1}',  # fields missing
    '{"generation": "one", "population": [], "evaluated": [], "best": null, "history": [], "seconds": 0}',
    '{"generation": 1, "population": [[999]], "evaluated": [], "best": null, "history": [], "seconds": 0}',
])
def test_a_damaged_ga_state_is_one_line(evaluator, tmp_path, state):
    with pytest.raises(DamagedStateError, match="state.json is damaged"):
        ga_search(evaluator, GAConfig(beta=0.0, population=4, generations=2), _folder(tmp_path, state))


def test_a_damaged_greedy_state_is_one_line(evaluator, tmp_path):
    state = json.dumps({"chosen": "L0.H0", "metric": 0.5, "fitness": 0.5, "history": [], "done": False})
    with pytest.raises(DamagedStateError, match=r"state\.json is damaged \(chosen"):
        greedy_search(evaluator, GreedyConfig(beta=0.0, max_heads=1), _folder(tmp_path, state))


def test_a_damaged_tensor_checkpoint_is_one_line(tmp_path):
    folder = RunFolder(tmp_path / "out", {"strategy": "bp"})
    folder.save_tensors({"logits": torch.zeros(2, 2)}, CHECKPOINT)
    data = (folder.path / CHECKPOINT).read_bytes()
    (folder.path / CHECKPOINT).write_bytes(data[: len(data) // 2])
    with pytest.raises(DamagedStateError, match=f"{CHECKPOINT} is damaged"):
        folder.load_tensors(CHECKPOINT)


def test_a_sound_state_still_resumes(tmp_path):
    folder = _folder(tmp_path, '{"scores": {"L0.H0": 0.25}}')
    from clipheads.search.scan import ScanState

    assert folder.load_state(schema=ScanState) == {"scores": {"L0.H0": 0.25}}


@pytest.mark.parametrize("checkpoint", [{"logits": torch.zeros(2, 2)}, "not a dict"])
def test_a_bp_checkpoint_with_missing_fields_is_one_line(planted_setup, tmp_path, checkpoint):
    from clipheads.search import BPConfig, bp_search

    backend, pixels, captions, objective = planted_setup
    evaluator = MaskEvaluator(backend, pixels, objective, batch_size=16, split="val")
    folder = RunFolder(tmp_path / "out", {"strategy": "bp"})
    folder.save_tensors(checkpoint, CHECKPOINT)
    with pytest.raises(DamagedStateError, match=f"{CHECKPOINT} is damaged"):
        bp_search(evaluator, captions, torch.arange(len(captions)), BPConfig(beta=0.1, epochs=1), folder)
