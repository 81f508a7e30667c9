"""World training's learning-rate schedule is transformers' (``get_wsd_schedule``) and gives, float for float, the
schedule the bundled model was trained with: linear warm-up from lr / W, then cosine decay to 0."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from clipheads.world.train import TrainConfig, lr_schedule


def _lrs(make, steps: int, lr: float) -> list[float]:
    """The lr each of ``steps`` optimiser updates uses (two parameter groups, as world training has)."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))]},
              {"params": [torch.nn.Parameter(torch.zeros(1))], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()"
        scheduler = make(optimizer)
        used = []
        for _ in range(steps):
            assert optimizer.param_groups[0]["lr"] == optimizer.param_groups[1]["lr"]
            used.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
    return used


def _published(steps: int, warmup_fraction: float, lr: float) -> list[float]:
    """The schedule as the bundled model's training wrote it (clipheads' own LambdaLR factor before issue 22)."""
    warmup = max(1, round(steps * warmup_fraction))
    factors = [(s + 1) / warmup if s < warmup else
               0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, steps - warmup)))) for s in range(steps)]
    return [lr * f for f in factors]


@pytest.mark.parametrize(("steps", "lr"), [(TrainConfig.steps, TrainConfig.lr), (40, 3e-3), (60, 1e-3), (2, 1e-3),
                                           (1, 1e-3)])
def test_the_schedule_is_the_bundled_models_float_for_float(steps, lr):
    fraction = TrainConfig.warmup_fraction
    assert _lrs(lambda o: lr_schedule(o, steps, fraction), steps, lr) == _published(steps, fraction, lr)


def test_transformers_cosine_with_warmup_differs_in_the_warm_up():
    """Why ``get_wsd_schedule``: the cosine schedule starts at lr 0, one warm-up step behind (1200 steps: the 48
    warm-up steps differ by lr / 48); started one step in, it shifts the cosine decay instead."""
    steps, lr = TrainConfig.steps, TrainConfig.lr
    ours = _published(steps, TrainConfig.warmup_fraction, lr)
    cosine = _lrs(lambda o: get_cosine_schedule_with_warmup(o, 48, steps), steps, lr)
    differ = [s for s in range(steps) if cosine[s] != ours[s]]
    assert differ == list(range(48)) and cosine[0] == 0.0
    assert max(abs(cosine[s] - ours[s]) for s in differ) == pytest.approx(lr / 48, rel=1e-9)
