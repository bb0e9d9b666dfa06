"""onnxruntime sessions with the thread counts we choose.

onnxruntime's default uses every core for one inference; with STT, the LLM
and TTS sharing a small CPU, each ONNX engine gets an explicit budget.
"""
from __future__ import annotations

from pathlib import Path

from .protocols import ModelUnavailable


def cpu_session(model: Path, what: str, *, threads: int = 1, memory_arena: bool = True, log_level: int = 3):
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - the dependency is declared
        raise ModelUnavailable("onnxruntime is not installed") from exc
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.enable_cpu_mem_arena = memory_arena
    opts.log_severity_level = log_level
    # Pool threads spin after each run by default, taking the core the LLM or
    # Whisper needs next; a few microseconds of wake-up are cheaper here.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return onnxruntime.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelUnavailable(f"cannot load {what} {model}: {exc}") from exc
