"""Two processes under torchrun (gloo, CPU) give the same scan, GA and BP result as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipheads.search import Distributed

WORKER = Path(__file__).with_name("planted.py")


def test_two_processes_equal_one(tmp_path, planted_module):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               str(tmp_path / "two")]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["world_size"] == 2
    assert 0 < two["evaluated_here"] < two["evaluated"]  # rank 0 did only its share

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as the workers
    try:
        one = planted_module.scan_and_ga(str(tmp_path / "one"), Distributed())
    finally:
        torch.set_num_threads(threads)
    assert one["evaluated_here"] == one["evaluated"] == two["evaluated"]
    assert two["scores"] == one["scores"]
    assert two["mask"] == one["mask"] == [planted_module.PLANTED]
    assert two["history"] == one["history"]
    assert (tmp_path / "two" / "mask.json").read_text() == (tmp_path / "one" / "mask.json").read_text()
    # BP splits each batch over the ranks and sums the gate gradients: equal up to summation order
    torch.testing.assert_close(torch.tensor(two["bp_gates"]), torch.tensor(one["bp_gates"]), atol=1e-5, rtol=0)
    assert two["bp_loss"] == pytest.approx(one["bp_loss"], abs=1e-5)
    assert two["bp_mask"] == one["bp_mask"]
