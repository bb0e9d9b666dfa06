"""Device and precision auto-selection for CTranslate2 engines.

"auto" means CUDA float16 where CTranslate2 sees a GPU, else CPU with the
engine's CPU default (int8 for Whisper, float32 for the small LLM whose int8
answers drift).  The choice is logged so a missing GPU is visible.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import ctranslate2

from .protocols import ModelUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    device: str        # "cpu" | "cuda"
    compute_type: str  # "int8", "float16", "float32", ...

    def __str__(self) -> str:
        return f"{self.device}/{self.compute_type}"


def cuda_device_count() -> int:
    try:
        return ctranslate2.get_cuda_device_count()
    except Exception:  # a broken CUDA install must not stop a CPU start
        log.exception("could not query CUDA devices; assuming none")
        return 0


def select_placement(
    what: str,
    device: str = "auto",
    compute_type: str = "auto",
    *,
    cpu_default: str = "int8",
    cuda_default: str = "float16",
) -> Placement:
    gpus = cuda_device_count()
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
        if device == "cpu":
            log.info("%s: no CUDA device visible to CTranslate2, running on CPU", what)
    elif device == "cuda" and gpus == 0:
        raise ModelUnavailable(f"{what}: device 'cuda' requested but CTranslate2 sees no CUDA device")
    if compute_type == "auto":
        compute_type = cuda_default if device == "cuda" else cpu_default
    placement = Placement(device, compute_type)
    log.info("%s runs on %s", what, placement)
    return placement
