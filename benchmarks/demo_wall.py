"""Wall time of ``clipheads demo`` with the default threads, on a quiet machine and with one core kept busy.

Runs the demo (``--quick`` by default, or the full one with ``--full``) twice in fresh processes with the default
``--threads`` (clipheads' default, 1 unless ``$CLIPHEADS_THREADS``/``$OMP_NUM_THREADS`` is set: both are unset for
the runs): first as the machine is, then while a busy-loop subprocess keeps one core busy (it ends by itself after
``--busy-seconds`` at most and is stopped when the run ends). Prints date, machine, cores, the load average before
each run and both wall times with their ratio. A benchmark, not a test: the figures depend on what else runs.

    python benchmarks/demo_wall.py [--full] [--out /tmp/demo-wall]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUSY = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def run_demo(out: Path, full: bool) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "CLIPHEADS_THREADS")}
    command = [sys.executable, "-m", "clipheads", "demo", "--out", str(out), *([] if full else ["--quick"])]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full demo (default: --quick)")
    parser.add_argument("--busy-seconds", type=float, default=3600.0, help="upper bound of the busy loop's life")
    parser.add_argument("--out", type=Path, default=None, help="folder for the two demo outputs (default: a temp one)")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="demo-wall-"))
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
          f"{os.cpu_count()} cores, python {platform.python_version()}, demo {'full' if args.full else '--quick'}, "
          "default --threads")
    times = {}
    for condition in ("as is", "one core busy"):
        out = root / condition.replace(" ", "-")
        shutil.rmtree(out, ignore_errors=True)
        print(f"{condition}: load average before {os.getloadavg()[0]:.1f}", flush=True)
        busy = None
        if condition == "one core busy":
            busy = subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=args.busy_seconds)])
        try:
            times[condition] = run_demo(out, args.full)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        print(f"{condition}: demo wall {times[condition]:.1f} s", flush=True)
    print(f"ratio busy/as-is {times['one core busy'] / times['as is']:.2f}")


if __name__ == "__main__":
    main()
