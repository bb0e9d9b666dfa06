"""onnxruntime sessions: the execution provider chosen for the device, the thread counts we choose.

Device selection (Piper TTS and Silero VAD), the same rule as the
CTranslate2 engines' (models/device.py):

* ``"auto"``: ONNX Runtime's CUDA execution provider when this onnxruntime
  build has it (the ``onnxruntime-gpu`` wheel) *and* a CUDA device is visible
  (counted by CTranslate2, as for Whisper and the LLM); else the CPU.  A GPU
  that is visible but unused because the installed onnxruntime has no CUDA
  provider is logged as a warning naming the package to install;
* ``"cpu"``: the CPU provider, whatever is installed;
* ``"cuda"``: the CUDA provider or `ModelUnavailable`.

ONNX Runtime falls back to the CPU by itself when the CUDA provider cannot
load (no cuDNN, a driver mismatch) and only logs it; the session's actual
providers are checked after creation, so that fallback is a warning here
("auto") or an error ("cuda"), never silent.  The CUDA provider runs with
``cudnn_conv_algo_search = HEURISTIC``, as Piper's own loader does
(piper/voice.py): the default EXHAUSTIVE search benchmarks every new input
shape, and every sentence is a new shape for a TTS voice.

On CPU, onnxruntime's default uses every core for one inference; with STT,
the LLM and TTS sharing a small CPU, each ONNX engine gets an explicit budget.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .protocols import ModelUnavailable

log = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
#: the CUDA provider's options (see the module docstring)
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class OnnxPlacement:
    """Where an ONNX model runs: ``device`` "cpu" | "cuda", and the providers given to ONNX Runtime, in order."""

    device: str
    providers: tuple[Any, ...]

    def __str__(self) -> str:
        return self.device


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - the dependency is declared
        raise ModelUnavailable("onnxruntime is not installed") from exc
    return onnxruntime


def select_providers(what: str, device: str = "auto") -> OnnxPlacement:
    """The execution providers for ``what`` on ``device`` ("auto" | "cpu" | "cuda"); the choice is logged.

    Raises `ModelUnavailable` for "cuda" without a CUDA provider or without a
    visible device, and `ValueError` for an unknown device name.
    """
    if device not in DEVICES:
        raise ValueError(f"{what}: device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        log.info("%s runs on cpu (configured)", what)
        return OnnxPlacement("cpu", (CPU_PROVIDER,))
    from .device import cuda_device_count

    has_provider = CUDA_PROVIDER in _onnxruntime().get_available_providers()
    gpus = cuda_device_count()
    if has_provider and gpus > 0:
        log.info("%s runs on cuda (ONNX Runtime's CUDA provider, %d device(s) visible)", what, gpus)
        return OnnxPlacement("cuda", ((CUDA_PROVIDER, dict(CUDA_OPTIONS)), CPU_PROVIDER))
    if device == "cuda":
        missing = ("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu instead of onnxruntime)"
                   if not has_provider else "no CUDA device is visible")
        raise ModelUnavailable(f"{what}: device 'cuda' requested but {missing}")
    if gpus > 0:
        log.warning("%s runs on cpu: a CUDA device is visible but the installed onnxruntime has no "
                    "CUDAExecutionProvider (pip install onnxruntime-gpu to use it)", what)
    else:
        log.info("%s runs on cpu: no CUDA device visible", what)
    return OnnxPlacement("cpu", (CPU_PROVIDER,))


def onnx_session(model: Path, what: str, *, device: str = "auto", threads: int = 1, memory_arena: bool = True,
                 log_level: int = 3):
    """An ``InferenceSession`` for ``model`` on ``device`` (see `select_providers`), ``threads`` CPU threads.

    Raises `ModelUnavailable` when the model cannot be loaded, or when
    "cuda" was asked for and ONNX Runtime fell back to the CPU.
    """
    onnxruntime = _onnxruntime()
    placement = select_providers(what, device)
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.enable_cpu_mem_arena = memory_arena
    opts.log_severity_level = log_level
    # Pool threads spin after each run by default, taking the core the LLM or
    # Whisper needs next; a few microseconds of wake-up are cheaper here.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = onnxruntime.InferenceSession(str(model), sess_options=opts, providers=list(placement.providers))
    except Exception as exc:
        raise ModelUnavailable(f"cannot load {what} {model} on {placement}: {exc}") from exc
    if placement.device == "cuda":
        used = session.get_providers()
        if not used or used[0] != CUDA_PROVIDER:
            message = f"{what}: ONNX Runtime could not start its CUDA provider (session providers: {used})"
            if device == "cuda":
                raise ModelUnavailable(message)
            log.warning("%s; running on cpu", message)
    return session


def session_device(session) -> str:
    """"cuda" when ``session`` runs on ONNX Runtime's CUDA provider, else "cpu"."""
    providers = session.get_providers()
    return "cuda" if providers and providers[0] == CUDA_PROVIDER else "cpu"


def cpu_session(model: Path, what: str, *, threads: int = 1, memory_arena: bool = True, log_level: int = 3):
    """An ``InferenceSession`` on the CPU provider (`onnx_session` with ``device="cpu"``)."""
    return onnx_session(model, what, device="cpu", threads=threads, memory_arena=memory_arena, log_level=log_level)
