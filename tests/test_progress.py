"""Stage events: one line per finished stage with its time, and the time left scaled from the time spent."""

from __future__ import annotations

import logging

import pytest

from clipheads.progress import StageEvent, Stages, format_seconds


def test_stages_estimate_the_rest_from_the_plan(monkeypatch):
    clock = iter([100.0, 110.0, 140.0, 141.0])  # start, then perf_counter at each done()
    monkeypatch.setattr("clipheads.progress.time.perf_counter", lambda: next(clock))
    events: list[StageEvent] = []
    stages = Stages({"scan": 1.0, "AAT-GA": 3.0, "report": 0.1}, events.append)
    first = stages.done("scan", 10.0)
    assert (first.index, first.total, first.elapsed) == (1, 3, 10.0)
    assert first.remaining == pytest.approx(10.0 * 3.1 / 1.0)  # 10 s for 1 unit -> 31 s for 3.1 units
    second = stages.done("AAT-GA", 30.0)
    assert second.remaining == pytest.approx(40.0 * 0.1 / 4.0)
    last = stages.done("report", 1.0)
    assert last.remaining is None and events == [first, second, last]
    assert str(second) == "[2/3] AAT-GA done in 30.0 s; about 1 s left"
    assert str(last) == "[3/3] report done in 1.0 s"
    with pytest.raises(KeyError, match="not in the plan"):
        stages.done("CCS", 1.0)


def test_stages_log_without_a_callback(caplog):
    with caplog.at_level(logging.INFO, logger="clipheads.progress"):
        Stages({"layer scan": 1.0, "CCS": 1.0}).done("layer scan", 2.5)
    assert "[1/2] layer scan done in 2.5 s; about" in caplog.text


def test_format_seconds():
    assert (format_seconds(42.4), format_seconds(185), format_seconds(-3)) == ("42 s", "3 min 5 s", "0 s")


def test_stage_times_a_block_and_expect_revises_the_plan(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 3.0, 3.5, 4.0, 4.0])  # start; enter/leave/done of each block
    monkeypatch.setattr("clipheads.progress.time.perf_counter", lambda: next(clock))
    events: list[StageEvent] = []
    stages = Stages({"data": 1.0, "scan": 1.0}, events.append)
    with stages.stage("data"):
        stages.expect("scan", 0.5)  # the data counted: the scan is half as much work as first thought
    assert events[0].seconds == 2.0 and events[0].remaining == pytest.approx(3.0 * 0.5 / 1.0)
    with pytest.raises(RuntimeError), stages.stage("scan"):
        raise RuntimeError("a failed stage is not reported")
    assert len(events) == 1 and "scan" not in stages.seconds
    with pytest.raises(KeyError, match="not in the plan"):
        stages.expect("CCS", 1.0)
