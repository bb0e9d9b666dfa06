"""Device selection for PyTorch engines (Coqui TTS), the counterpart of models/device.py.

"auto" means CUDA where PyTorch sees a GPU, else the CPU; the choice is logged so a
missing GPU is visible, and asking for "cuda" without one is an error, not a silent
fallback.  torch is imported here, on first use, so that the default install (no
Coqui extra, no torch) never loads it.
"""
from __future__ import annotations

import logging

from .protocols import ModelUnavailable

log = logging.getLogger(__name__)


def select_torch_device(what: str, device: str = "auto") -> str:
    """``"cpu"`` or ``"cuda"`` for ``what`` (a name for the log).

    Raises `ModelUnavailable` for ``device="cuda"`` when ``torch.cuda.is_available()`` is False,
    and `ValueError` for a device other than auto | cpu | cuda."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{what}: device must be auto, cpu or cuda, got {device!r}")
    gpu = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if gpu else "cpu"
        if not gpu:
            log.info("%s: no CUDA device visible to PyTorch %s, running on CPU", what, torch.__version__)
    elif device == "cuda" and not gpu:
        raise ModelUnavailable(f"{what}: device 'cuda' requested but PyTorch {torch.__version__} sees no CUDA device")
    log.info("%s runs on %s (PyTorch %s)", what, device, torch.__version__)
    return device
