"""The stages of a long CLI command, one line per finished stage on stderr (``[2/5] search split done in 3.1 s;
about 1 min 4 s left``), by :class:`clipheads.progress.Stages`, as ``clipheads demo`` prints them.

Each command lists its stages with an expected cost in seconds from the work it will do (images, masks, epochs)
times the per-unit costs below; only the ratios matter, since :class:`~clipheads.progress.Stages` scales the time
spent so far. Costs that depend on data not yet read are revised with :meth:`~clipheads.progress.Stages.expect`
once it is. The stages start after the model is loaded and the arguments are checked against it, so that a bad
argument is still reported in one line; the time spent, which the estimate scales, is counted from there.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from clipheads.progress import StageEvent, Stages

# Seconds per unit of work, measured on one quick demo (bundled model, 1 thread, 2 shared cores, 2026-11-29; see
# clipheads.demo.pipeline.stage_plan): reading and encoding one image, one image's forward under one mask, one
# image's epoch of AAT-BP, one image's per-head decomposition (describe), one image's pass with one layer
# cancelled (layer scan), one head labelled and judged (ccs); a model load and writing results as a fixed cost.
LOAD_MODEL = 2.0
PER_IMAGE = 0.07
PER_MASK_IMAGE = 0.015
PER_BP_EPOCH_IMAGE = 0.10
PER_DESCRIBE_IMAGE = 0.10
PER_LAYER_IMAGE = 0.07
PER_TEXT = PER_IMAGE  # a work count: one text-tower forward per text, as one image-tower forward per image
PER_JUDGED_HEAD = 11.0 / 48  # the demo's CCS stage: 11 s for the bundled model's 48 heads (offline judge)
WRITE = 1.0
GUESS_IMAGES = 100  # a split's size before it is read (revised once it is)


def print_stage(event: StageEvent) -> None:
    """Write one finished stage to stderr, above any progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(str(event), file=sys.stderr)


def command_stages(plan: dict[str, float], show: bool = True) -> Stages:
    """:class:`~clipheads.progress.Stages` over ``plan`` (stage -> expected seconds, in run order) that prints each
    finished stage to stderr (``show=False``: silently, e.g. on the other ranks of a ``torchrun`` job)."""
    return Stages(plan, print_stage if show else quiet)


def quiet(event: StageEvent) -> None:
    """A report that shows nothing (other ranks of a distributed run)."""


class Laps:
    """Stages that end one after another inside one library call, from its callback (a GA generation, a beta of a
    sweep, a pruning run): each one's time runs from the end of the previous one (or from ``start()``)."""

    def __init__(self, stages: Stages) -> None:
        self.stages, self.last = stages, time.perf_counter()

    def start(self) -> None:
        """The next stage starts now."""
        self.last = time.perf_counter()

    def end(self, name: str, skipped: Sequence[str] = ()) -> None:
        """Stage ``name`` ends now; the stages ``skipped`` that did not run here (done by an earlier, resumed run)
        are expected to cost nothing, so that they do not count in the time left."""
        for other in skipped:
            if other not in self.stages.seconds:
                self.stages.expect(other, 0.0)
        now = time.perf_counter()
        self.stages.done(name, now - self.last)
        self.last = now
