"""The launchers that cannot run here: the Slurm example (torchrun across nodes over NCCL) and benchmarks/gpu.sh.
Their bash syntax is checked, the Slurm script runs with stand-ins for ``srun`` and ``scontrol`` that record the
command, and that command is parsed by torchrun's own argument parser and by the clipheads command line."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import typer.main
from torch.distributed.run import get_args_parser

from clipheads.cli import app

try:  # typer 0.2x parses with its own copy of click
    from typer._click import Context
except ImportError:  # pragma: no cover - older typer on click
    from click import Context

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "examples" / "slurm" / "search.sbatch"
GPU_SH = ROOT / "benchmarks" / "gpu.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.mark.parametrize("script", [SBATCH, GPU_SH], ids=lambda p: p.name)
def test_bash_syntax(script):
    run = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def launch(tmp_path: Path, **env: str) -> list[str]:
    """Run the sbatch script as Slurm would on the first node; return the argument list it gave ``srun``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" > {tmp_path}/srun.args\n')
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] && '
                                      'printf "gpu-a01\\ngpu-a02\\n"\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    data = tmp_path / "karpathy.json"
    data.write_text("{}")
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu-a[01-02]",
             "SLURM_GPUS_ON_NODE": "8", "DATA": str(data)}
    environment = {**os.environ, **slurm, **env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run(["bash", str(SBATCH)], env=environment, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    return (tmp_path / "srun.args").read_text().split("\0")[:-1]


def clipheads_args(words: list[str]) -> dict:
    """The options of ``clipheads WORDS`` as click's parser reads them (name -> text; unknown options, missing
    values and stray words fail; callbacks such as the device check do not run: there is no GPU here)."""
    command = typer.main.get_command(app).commands[words[0]]
    options, extra, _ = command.make_parser(Context(command, info_name=f"clipheads {words[0]}")).parse_args(
        args=list(words[1:]))
    assert not extra, f"stray words {extra}"
    required = {p.name for p in command.params if p.required}
    assert required <= set(options), f"missing {required - set(options)}"
    return options


def test_slurm_example_launches_torchrun_across_nodes(tmp_path):
    args = launch(tmp_path)
    assert args[:2] == ["--kill-on-bad-exit=1", "torchrun"]  # one torchrun per node (ntasks-per-node=1)
    torchrun = get_args_parser().parse_args(args[2:])
    assert (torchrun.nnodes, torchrun.nproc_per_node) == ("2", "8")
    assert (torchrun.rdzv_backend, torchrun.rdzv_endpoint, torchrun.rdzv_id) == ("c10d", "gpu-a01:29500", "4242")
    assert torchrun.module and torchrun.training_script == "clipheads"  # python -m clipheads
    params = clipheads_args(torchrun.training_script_args)
    assert params["device"] == "cuda" and params["strategy"] == "ga"
    assert (params["population"], params["generations"]) == ("50", "50")
    assert params["model"] == "open_clip:ViT-L-14/openai" and params["data"] == str(tmp_path / "karpathy.json")
    assert params["out"] == "runs/search-4242" and "memory_budget" not in params


def test_slurm_example_takes_its_settings_from_the_environment(tmp_path):
    args = launch(tmp_path, MEMORY_BUDGET="40GiB", PRECISION="amp_bf16", GPUS_PER_NODE="4",
                  MODEL="open_clip:ViT-H-14/laion2b_s32b_b79k")
    torchrun = get_args_parser().parse_args(args[2:])
    assert torchrun.nproc_per_node == "4"
    params = clipheads_args(torchrun.training_script_args)
    assert (params["memory_budget"], params["precision"]) == ("40GiB", "amp_bf16")
    assert params["model"] == "open_clip:ViT-H-14/laion2b_s32b_b79k"


def test_gpu_script_runs_the_scaling_and_bf16_benchmarks_on_cuda():
    lines = [line for line in GPU_SH.read_text().splitlines() if line.startswith("python benchmarks/")]
    scripts = {line.split()[1]: line for line in lines}
    for name in ("benchmarks/search_scaling.py", "benchmarks/search_bf16.py"):
        assert name in scripts and "--device cuda" in scripts[name]
        assert (ROOT / name).exists()
