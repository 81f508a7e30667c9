"""How a run uses the machine: torch's CPU threads, and the facts about a run that each results file records.

torch's intra-op threads spin while they wait for a core. On a machine whose cores other jobs also use, more threads
than free cores costs several times the CPU time for the same result (measured in ``benchmarks/threads.py``, see the
README). So clipheads runs on ONE thread unless asked otherwise: ``--threads N`` on the command line,
:func:`set_threads` in Python, or ``CLIPHEADS_THREADS=N`` (``0`` or ``auto``: the cores this process may run on).

``OMP_NUM_THREADS`` is read by OpenMP when torch starts; :func:`set_threads` (``torch.set_num_threads``) overrides it
for torch's intra-op pool at any time, so calling it at the start of a command is enough. An explicit
``OMP_NUM_THREADS`` is respected as the default when neither ``--threads`` nor ``CLIPHEADS_THREADS`` is given.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time

import torch

from clipheads.errors import ClipHeadsError

log = logging.getLogger(__name__)

DEFAULT_THREADS = 1
ENV = "CLIPHEADS_THREADS"


def available_cores() -> int:
    """CPU cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count()`` where that is missing)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_threads(threads: int | str | None = None) -> int:
    """The number of intra-op threads to use.

    Args:
        threads: a positive count, at most :func:`available_cores` (an environment variable may give more);
            ``0`` or ``"auto"``: :func:`available_cores`; ``None``: ``$CLIPHEADS_THREADS``,
            else ``$OMP_NUM_THREADS``, else :data:`DEFAULT_THREADS` (1).

    Raises:
        ClipHeadsError: a negative or unreadable count, or an explicit count above :func:`available_cores`.
    """
    source = "--threads"
    if threads is None:
        for name in (ENV, "OMP_NUM_THREADS"):
            if os.environ.get(name, "").strip():
                threads, source = os.environ[name].strip(), name
                break
        else:
            return DEFAULT_THREADS
    if isinstance(threads, str):
        if threads.lower() == "auto":
            return available_cores()
        try:
            threads = int(threads)
        except ValueError:
            raise ClipHeadsError(f"{source} must be a number of threads or 'auto' (got {threads!r})") from None
    if threads < 0:
        raise ClipHeadsError(f"{source} must be 0 (auto) or a positive number of threads (got {threads})")
    cores = available_cores()
    if source == "--threads" and threads > cores:
        # torch starts that many threads: beyond the cores they only cost CPU time, and a count in the tens of
        # thousands exhausts memory (then loading a model fails with a misleading mmap error)
        raise ClipHeadsError(f"--threads {threads} is more than the {cores} cores this process may use; give at most "
                             f"{cores} (0 = all of them)")
    return threads or cores


def set_threads(threads: int | str | None = None) -> int:
    """Set torch's intra-op CPU threads (see :func:`resolve_threads` for ``threads``); return the number set.

    Call it before the work starts (the CLI does, for every command). Results files record it (:func:`run_meta`).
    """
    n = resolve_threads(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    log.debug("torch threads: %d", n)
    return n


def run_meta() -> dict:
    """Facts about this run for a results file: clipheads and torch versions, threads, cores, host, UTC time, and,
    inside a command that takes ``--precision`` (:func:`clipheads.precision.use_precision`), its precision
    (:meth:`clipheads.precision.Precision.to_dict`), and the model's loading options given (``--revision``,
    ``--attn-implementation``; :func:`clipheads.models.load_options`)."""
    from clipheads import __version__
    from clipheads.models import current_load_options
    from clipheads.precision import current_precision

    precision = current_precision()
    loading = {k: v for k, v in current_load_options().items() if k != "cache_dir"}  # where, not which weights
    return {"clipheads": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cores_available": available_cores(), "python": platform.python_version(), "platform": sys.platform,
            "machine": platform.machine(), "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **({"precision": precision.to_dict()} if precision is not None else {}),
            **({"load_options": loading} if loading else {})}
