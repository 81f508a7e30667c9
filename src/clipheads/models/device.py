"""Device strings checked before any work: one clear line for a device this machine does not have."""

from __future__ import annotations

import torch

from clipheads.errors import DeviceError


def _backend(kind: str):
    """torch's module for an accelerator kind (``torch.cuda``, ``torch.xpu``, ``torch.backends.mps``...)."""
    if kind == "mps":
        return getattr(torch.backends, "mps", None)
    return getattr(torch, kind, None)


def check_device(device: str | torch.device | None) -> torch.device | None:
    """Parse ``device`` and make sure this machine has it.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"xpu:0"``, a ``torch.device`` or ``None``
            (``None`` means "where the model already is" and is returned as is).

    Returns:
        the parsed ``torch.device`` (or ``None``).

    Raises:
        DeviceError: the string is not a torch device (``"gpu0"``), the accelerator is not available (``"cuda"``
            on a machine without a visible CUDA device, ``"mps"`` off Apple silicon) or the index is out of range
            (``"cuda:9"`` with one GPU).
    """
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N, mps or another torch device "
                          "string") from None
    if parsed.type == "cpu":
        return parsed
    backend = _backend(parsed.type)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        hint = " (check the driver and CUDA_VISIBLE_DEVICES)" if parsed.type == "cuda" else ""
        raise DeviceError(f"device {str(device)!r} is not available: torch {torch.__version__} sees no "
                          f"{parsed.type} device on this machine{hint}; use cpu instead")
    count = getattr(backend, "device_count", lambda: 1)()
    if parsed.index is not None and parsed.index >= count:
        raise DeviceError(f"device {str(device)!r} is not available: this machine has {count} {parsed.type} "
                          f"device{'s' if count != 1 else ''} ({parsed.type}:0 .. {parsed.type}:{count - 1})")
    return parsed
