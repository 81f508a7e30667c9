"""Stages of a long run: one event per finished stage, with its time and an estimate of the time left.

The estimate scales the time spent so far by the expected cost of the stages still to run relative to those done
(``plan``: stage name -> expected relative cost, e.g. from a measured run). Library code reports events to a
callback (the CLI prints them) or, without one, logs them at INFO.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageEvent:
    """A finished stage: ``index`` (1-based) of ``total``, its wall time and the run's, and the estimated rest."""

    index: int
    total: int
    name: str
    seconds: float
    elapsed: float
    remaining: float | None  # seconds, None once the last stage is done

    def __str__(self) -> str:
        left = f"; about {format_seconds(self.remaining)} left" if self.remaining is not None else ""
        return f"[{self.index}/{self.total}] {self.name} done in {self.seconds:.1f} s{left}"


def format_seconds(seconds: float) -> str:
    """``"42 s"``, ``"3 min 5 s"``."""
    seconds = max(0, round(seconds))
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60} s"


class Stages:
    """Time the stages of a run in order and report each one as it ends.

    Args:
        plan: every stage's name -> expected relative cost (any unit; only ratios matter), in run order.
        report: called with each :class:`StageEvent` (default: ``log.info``).
    """

    def __init__(self, plan: dict[str, float], report: Callable[[StageEvent], None] | None = None) -> None:
        self.plan = dict(plan)
        self.report = report
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    def expect(self, name: str, cost: float) -> None:
        """Revise the expected cost of stage ``name`` before it ends, e.g. once the data it works on is counted."""
        if name not in self.plan:
            raise KeyError(f"stage {name!r} is not in the plan ({', '.join(self.plan)})")
        self.plan[name] = cost

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as stage ``name`` and report it when the block ends (not when it raises)."""
        t0 = time.perf_counter()
        yield
        self.done(name, time.perf_counter() - t0)

    def done(self, name: str, seconds: float) -> StageEvent:
        """Record that stage ``name`` (a key of ``plan``) took ``seconds``; report and return its event."""
        if name not in self.plan:
            raise KeyError(f"stage {name!r} is not in the plan ({', '.join(self.plan)})")
        self.seconds[name] = seconds
        elapsed = time.perf_counter() - self.started
        done_cost = sum(self.plan[n] for n in self.seconds)
        left_cost = sum(cost for n, cost in self.plan.items() if n not in self.seconds)
        remaining = elapsed * left_cost / done_cost if left_cost and done_cost > 0 else None
        event = StageEvent(list(self.plan).index(name) + 1, len(self.plan), name, seconds, elapsed, remaining)
        if self.report is not None:
            self.report(event)
        else:
            log.info("%s", event)
        return event
