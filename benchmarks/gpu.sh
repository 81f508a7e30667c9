#!/usr/bin/env bash
# Every check that needs a GPU, in one run (for a session lent a GPU machine; CI has none):
#   bash benchmarks/gpu.sh [OUT]     -> OUT/gpu-*.txt (default: ./gpu-results)
# The GPU tests first (CUDA results equal the CPU's), then the benchmarks on the GPU, each with date and device.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu-device.txt" 2>&1
python -m pytest tests/gpu -p no:cacheprovider 2>&1 | tail -15 > "$out/gpu-tests.txt"
for n in 8 32; do
  python benchmarks/scan_speed.py --device cuda --images "$n" 2>&1 | tail -5 >> "$out/gpu-scan-speed.txt"
  python benchmarks/scan_speed.py --device cuda --images "$n" --backend open_clip 2>&1 | tail -5 >> "$out/gpu-scan-speed.txt"
done
python benchmarks/attribution_scan.py --device cuda 2>&1 | tail -25 > "$out/gpu-attribution.txt"
python benchmarks/overhead.py --device cuda 2>&1 | tail -12 > "$out/gpu-overhead.txt"
python benchmarks/search_scaling.py --device cuda --sizes 64,256,1024 --budget 2GiB --batch-size 64 2>&1 | tail -10 > "$out/gpu-search-scaling.txt"
python benchmarks/search_bf16.py --device cuda 2>&1 | tail -4 > "$out/gpu-search-bf16.txt"
tail -n +1 "$out"/gpu-*.txt
