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


def test_image_shares_tile_the_images():
    for n in (1, 2, 5, 9, 16):
        for world in (1, 2, 3, 4):
            shares = [Distributed(rank, world).image_share(n) for rank in range(world)]
            assert [i for share in shares for i in range(share.start, share.stop)] == list(range(n))
            assert max(s.stop - s.start for s in shares) - min(s.stop - s.start for s in shares) <= 1
    single = torch.arange(6.0).view(3, 2)
    assert Distributed().gather_rows(single, 3) is single  # one process: nothing to gather


def test_sharded_cache_two_processes_equal_one(tmp_path, planted_module):
    """Each rank caches only its share of the images (5 + 4 of 9), evaluates every mask on it and gathers the
    features: the scan, AAT-GA and layer features equal one process's; only rank 0 shows progress."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    (tmp_path / "two").mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               str(tmp_path / "two"), "sharded"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / "two" / f"result-{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["sharded"] for r in ranks] == [True, True]
    assert [r["cached_rows"] for r in ranks] == [[5] * ranks[0]["n_cached"], [4] * ranks[1]["n_cached"]]
    assert "AAT-BP needs every image's search cache" in ranks[0]["bp"]
    assert "single-head scan" in (tmp_path / "two" / "stderr-0.txt").read_text()
    assert (tmp_path / "two" / "stderr-1.txt").read_text() == ""  # progress shown once

    (tmp_path / "one").mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = planted_module.sharded(str(tmp_path / "one"), Distributed())
    finally:
        torch.set_num_threads(threads)
    assert one["sharded"] is False and one["cached_rows"] == [9] * one["n_cached"]
    for two in ranks:
        torch.testing.assert_close(torch.tensor(two["scores"]), torch.tensor(one["scores"]), atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.tensor(two["baseline"]), torch.tensor(one["baseline"]), atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.tensor(two["layers"]), torch.tensor(one["layers"]), atol=1e-6, rtol=0)
        assert two["mask"] == one["mask"]
        best = [h["best_fitness"] for h in one["history"]]
        assert [h["best_fitness"] for h in two["history"]] == pytest.approx(best, abs=1e-6)


def test_cli_scan_under_torchrun_shards_the_cache(tmp_path):
    """``clipheads scan`` under torchrun: each rank caches 3 of the 6 search images, the plan is printed once, and
    the scan equals one process's."""
    import numpy as np
    from PIL import Image

    from clipheads.models.random_init import random_hf_clip, save_hf

    save_hf(random_hf_clip("tiny", seed=3), tmp_path / "model")
    rng = np.random.default_rng(0)
    images = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        images.append({"filename": f"{i}.png", "split": "val" if i < 6 else "test", "imgid": i,
                       "sentences": [{"raw": f"a photo {i}"}, {"raw": f"the picture {i % 4}"}]})
    (tmp_path / "karpathy.json").write_text(json.dumps({"dataset": "toy", "images": images}))
    args = ["-m", "clipheads", "scan", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "karpathy.json"),
            "--batch-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *args, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.stdout.count("search cache plan (6 images, 3 on this rank)") == 1  # printed by rank 0 only
    assert "search cache plan (6 images)" in one.stdout
    scans = [json.loads((tmp_path / name / "scan.json").read_text()) for name in ("one", "two")]
    torch.testing.assert_close(torch.tensor(scans[1]["scores"]), torch.tensor(scans[0]["scores"]), atol=1e-6, rtol=0)
    assert scans[1]["baseline"] == pytest.approx(scans[0]["baseline"], abs=1e-6)
    assert scans[1]["harmful"] == scans[0]["harmful"]
