"""CCS arithmetic: majority votes, groups, score tables, top heads and resuming from a checkpoint."""

from __future__ import annotations

import math

import pytest

from clipheads.errors import DataError
from clipheads.explain.concepts import CCSResult, ccs_group, concept_consistency, majority
from clipheads.runkey import RunKeyError


class ListJudge:
    """Answers from a table: head descriptions -> label, and a fixed answer per description."""

    def __init__(self, name: str, answers: dict[str, bool], fail_on: str | None = None) -> None:
        self.name, self.answers, self.fail_on, self.calls = name, answers, fail_on, 0

    def label(self, descriptions):
        return descriptions[0].split()[0]

    def judge(self, label, descriptions):
        self.calls += 1
        if self.fail_on is not None and self.fail_on in descriptions:
            raise RuntimeError("endpoint down")
        return [self.answers.get(text, False) for text in descriptions]


DESCRIPTIONS = {"L0.H0": ["red a", "red b", "red c", "red d", "red e"],
                "L0.H1": ["dog a", "dog b", "dog c", "dog d", "dog e"],
                "L1.H1": ["sky a", "sky b", "sky c", "sky d", "sky e"]}


def test_majority_and_groups():
    assert majority([[True, True, False], [True, False, False], [False, True, True]]) == [True, True, False]
    assert majority([[True], [False]]) == [False]  # a tie is not a majority
    assert [ccs_group(c, 5) for c in (5, 4, 2, 1, 0)] == ["high", "moderate", "moderate", "low", "low"]


def test_ccs_counts_descriptions_consistent_by_majority(tmp_path):
    yes = {t: True for texts in DESCRIPTIONS.values() for t in texts}
    a = ListJudge("a", yes)
    b = ListJudge("b", {**yes, "dog a": False, "dog b": False, "sky a": False})
    c = ListJudge("c", {**yes, "dog a": False, **{f"sky {x}": False for x in "abcde"}})
    result = concept_consistency(DESCRIPTIONS, [a, b, c], shape=(2, 2))
    assert {h.head_label: h.ccs for h in result.heads} == {"L0.H0": 5, "L0.H1": 4, "L1.H1": 4}
    assert result["L0.H1"].consistent == [False, True, True, True, True]
    assert result["L0.H0"].label == "red" and result["L0.H0"].votes["b"] == [True] * 5
    scores = result.scores()
    assert scores[0].tolist() == [5.0, 4.0] and math.isnan(scores[1, 0]) and scores[1, 1] == 4
    assert result.group("high") == [(0, 0)] and result.group("moderate") == [(0, 1), (1, 1)]
    assert result.group("low") == [] and result.top(2)[0] == (0, 0)
    loaded = CCSResult.load(result.save(tmp_path / "ccs.json"))
    assert loaded.scores().nan_to_num(-1).tolist() == scores.nan_to_num(-1).tolist()
    assert loaded.to_dict()["groups"]["moderate"] == ["L0.H1", "L1.H1"]
    with pytest.raises(DataError, match="CCS group"):
        result.group("medium")


def test_finished_heads_are_kept_and_not_asked_again(tmp_path):
    checkpoint = tmp_path / "progress.json"
    yes = {t: True for texts in DESCRIPTIONS.values() for t in texts}
    failing = ListJudge("a", yes, fail_on="sky a")
    with pytest.raises(RuntimeError):
        concept_consistency(DESCRIPTIONS, failing, shape=(2, 2), checkpoint=checkpoint)
    assert checkpoint.is_file()
    working = ListJudge("a", yes)
    result = concept_consistency(DESCRIPTIONS, working, shape=(2, 2), checkpoint=checkpoint)
    assert working.calls == 1  # only L1.H1 was left
    assert [h.ccs for h in result.heads] == [5, 5, 5]
    # other judges: the checkpoint is refused with one line naming the change, and nobody is asked
    other = ListJudge("b", yes)
    with pytest.raises(RunKeyError, match="--judge changed from a to b") as refused:
        concept_consistency(DESCRIPTIONS, other, shape=(2, 2), checkpoint=checkpoint)
    assert "\n" not in str(refused.value) and other.calls == 0
