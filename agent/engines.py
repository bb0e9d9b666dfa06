"""Build the process-wide engines from configuration.

One registry per stage maps the configured engine name to a factory: a view
of the installed entry points (agent/plugins.py), where sub300's own engines
below are registered exactly like a third-party plugin's (pyproject.toml);
the rest of the code only sees the protocols in models/protocols.py.
Factories import their engine lazily, so an engine that is not configured
costs nothing.  Each process loads its engines once and shares them between
calls.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from sub300.models.bundled import is_bundled, resolve_bundled
from sub300.models.protocols import (
    LanguageModel,
    ModelUnavailable,
    SpeechRecognizer,
    SpeechSynthesizer,
    TurnCompletionModel,
    VoiceActivityDetector,
)

from . import plugins
from .config import Config

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
T = TypeVar("T", covariant=True)


# ------------------------------------------------------------------ factories
def _webrtc_vad(c: Config) -> VoiceActivityDetector:
    from sub300.models.vad_webrtc import WebRtcVad

    return WebRtcVad(aggressiveness=c.vad.aggressiveness, frame_ms=c.vad.frame_ms)


def _silero_vad(c: Config) -> VoiceActivityDetector:
    from sub300.models.vad_silero import SileroVad

    return SileroVad(threshold=c.vad.threshold, device=c.vad.device)


def _whisper(c: Config) -> SpeechRecognizer:
    from sub300.models.stt_service import ScheduledRecognizer, auto_max_batch, auto_workers
    from sub300.models.stt_whisper import WhisperRecognizer

    whisper = WhisperRecognizer(
        c.stt.model,
        device=c.stt.device,
        compute_type=c.stt.compute_type,
        cpu_threads=c.stt.cpu_threads,
        beam_size=c.stt.beam_size,
        language=c.stt.language or None,
        padding=c.stt.padding,
        window_s=c.stt.window_s,
        allow_download=c.models.allow_download,
    )
    # one shared service in front of the model: deadline classes, batching (models/stt_service.py)
    return ScheduledRecognizer(whisper, workers=auto_workers(c.stt.workers, whisper.device),
                               max_batch=auto_max_batch(c.stt.max_batch, whisper.device))


def embedded_llm_dir(c: Config, progress: Progress = print) -> Path:
    """The CTranslate2 directory for the embedded LLM, converting a GGUF once."""
    ref = c.llm.model
    path = resolve_bundled(ref) if is_bundled(ref) else Path(os.path.expanduser(ref))
    if path.suffix == ".gguf":
        from sub300.models.gguf_to_ct2 import ensure_ct2_from_gguf

        return ensure_ct2_from_gguf(path, c.cache_path / "ct2", progress=progress)
    if not path.is_dir():
        raise ModelUnavailable(f"llm.model: {ref!r} is neither a .gguf file nor a CTranslate2 directory")
    return path


def _embedded_llm(c: Config) -> LanguageModel:
    from sub300.models.llm_ct2 import CTranslate2ChatModel

    return CTranslate2ChatModel(
        embedded_llm_dir(c, progress=lambda m: log.info("%s", m)),
        device=c.llm.device,
        compute_type=c.llm.compute_type,
        threads=c.llm.threads,
        max_batch=c.llm.max_batch,
    )


def _openai_llm(c: Config) -> LanguageModel:
    from sub300.models.llm_openai import OpenAIChatModel

    return OpenAIChatModel(
        c.llm.base_url,
        c.llm.remote_model,
        api_key=os.environ.get(c.llm.api_key_env) or None,
        connect_timeout_s=c.llm.connect_timeout_s,
        first_token_timeout_s=c.llm.first_token_timeout_s,
        idle_timeout_s=c.llm.idle_timeout_s,
        max_connections=c.llm.max_connections,
    )


def _openai_stt(c: Config) -> SpeechRecognizer:
    from sub300.models.stt_openai import OpenAIRecognizer

    return OpenAIRecognizer(
        c.stt.base_url,
        c.stt.remote_model,
        api_key=os.environ.get(c.stt.api_key_env) or None,
        language=c.stt.language or None,
        connect_timeout_s=c.stt.connect_timeout_s,
        response_timeout_s=c.stt.response_timeout_s,
        retries=c.stt.retries,
        max_connections=c.stt.max_connections,
    )


def _openai_tts(c: Config) -> SpeechSynthesizer:
    from sub300.models.tts_openai import OpenAISynthesizer

    return OpenAISynthesizer(
        c.tts.base_url,
        c.tts.remote_model,
        c.tts.remote_voice,
        sample_rate=c.tts.remote_sample_rate,
        api_key=os.environ.get(c.tts.api_key_env) or None,
        connect_timeout_s=c.tts.connect_timeout_s,
        first_byte_timeout_s=c.tts.first_byte_timeout_s,
        idle_timeout_s=c.tts.idle_timeout_s,
        retries=c.tts.retries,
        max_connections=c.tts.max_connections,
    )


def _piper(c: Config) -> SpeechSynthesizer:
    from sub300.models.tts_piper import PiperSynthesizer

    return PiperSynthesizer(c.tts.voice, threads=c.tts.threads, device=c.tts.device)


def _coqui(c: Config) -> SpeechSynthesizer:
    from sub300.models.tts_coqui import CoquiSynthesizer

    return CoquiSynthesizer(
        c.tts.coqui_model,
        device=c.tts.device,
        speaker=c.tts.coqui_speaker or None,
        language=c.tts.coqui_language or None,
        speaker_wav=c.tts.coqui_speaker_wav or None,
        stream_chunk_size=c.tts.coqui_stream_chunk_size,
        threads=c.tts.threads,
        allow_download=c.models.allow_download,
    )


def _espeak(c: Config) -> SpeechSynthesizer:
    from sub300.models.tts_espeak import EspeakSynthesizer

    return EspeakSynthesizer(c.tts.espeak_voice, speed_wpm=c.tts.espeak_speed_wpm)


def _smart_turn(c: Config) -> TurnCompletionModel:
    from sub300.models.turn_smart import SmartTurnModel

    return SmartTurnModel(c.turn.model, device=c.turn.device, threads=c.turn.threads)


def _no_turn_model(c: Config) -> None:
    """turn.detector = "vad": no turn-completion model (the VAD's fixed hangover ends every turn)."""
    return None


class EngineRegistry(Mapping[str, Callable[[Config], T]]):
    """One stage's engines by name: a read-only view of the installed entry points (agent/plugins.py).

    The names are those of the entry-point group (sub300's own engines and any installed plugin's);
    looking one up imports its factory, and a plugin that fails to import raises `PluginError` naming
    its package."""

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def __getitem__(self, name: str) -> Callable[[Config], T]:
        if name not in plugins.installed(self.stage):
            raise KeyError(name)
        return plugins.load_factory(self.stage, name)

    def __iter__(self) -> Iterator[str]:
        return iter(plugins.installed(self.stage))

    def __len__(self) -> int:
        return len(plugins.installed(self.stage))


VAD_ENGINES: EngineRegistry[VoiceActivityDetector] = EngineRegistry("vad")
STT_ENGINES: EngineRegistry[SpeechRecognizer] = EngineRegistry("stt")
LLM_ENGINES: EngineRegistry[LanguageModel] = EngineRegistry("llm")
TTS_ENGINES: EngineRegistry[SpeechSynthesizer] = EngineRegistry("tts")
#: engines that call an endpoint: not warmed up, no local worker pool (their limiter is max_connections)
REMOTE_ENGINE = "openai"
#: turn.detector -> its turn-completion model (None: the VAD's fixed hangover alone)
TURN_MODELS: EngineRegistry[TurnCompletionModel | None] = EngineRegistry("turn")
#: the stages an `Engines` bundle holds, as `load_engines`' ``given`` names them
STAGES = ("vad", "stt", "llm", "tts", "turn")


# ------------------------------------------------------------------ the bundle
@dataclass
class Engines:
    vad: VoiceActivityDetector
    stt: SpeechRecognizer
    llm: LanguageModel
    tts: SpeechSynthesizer
    #: the semantic end-of-turn model (turn.detector = "smart-turn"); None: the VAD's fixed hangover
    turn: TurnCompletionModel | None = None
    #: stages whose engine object was given (the Python API's ``Agent(engines=...)``) rather than built from
    #: the configuration: used as they are (no shared pool in front, not warmed up)
    given: frozenset[str] = frozenset()

    def describe(self) -> dict[str, str]:
        described = {
            "vad": self.vad.name,
            "stt": f"{self.stt.name} ({self.stt.device})",
            "llm": self.llm.name,
            "tts": self.tts.name,
        }
        if self.turn is not None:
            described["turn"] = f"{self.turn.name} ({self.turn.device})"
        return described

    async def aclose(self) -> None:
        stt_close = getattr(self.stt, "aclose", None)
        if stt_close is not None:
            await stt_close()
        close = getattr(self.llm, "aclose", None)
        if close is not None:
            await close()
        tts_close = getattr(self.tts, "aclose", None)     # a remote TTS's HTTP session
        if tts_close is not None:
            await tts_close()


def scheduled_tts(engine: SpeechSynthesizer, c: Config) -> SpeechSynthesizer:
    """The TTS engine as a shared service: a priority pool, first pieces first (models/tts_service.py).

    A remote engine (tts.engine = "openai") is returned as it is: its own limiter (tts.max_connections)
    orders its requests by deadline class, and a 1-worker local pool would serialize the endpoint."""
    if c.tts.engine == REMOTE_ENGINE:
        return engine
    from sub300.models.tts_service import ScheduledSynthesizer

    return ScheduledSynthesizer(engine, workers=c.tts.workers or 1)


def load_engines(config: Config, progress: Progress = print, given: Mapping[str, Any] | None = None) -> Engines:
    """Load every configured engine (blocking: seconds on first run).

    ``given``: stage ("vad", "stt", "llm", "tts", "turn") -> an engine object to use instead of the
    configured one, as it is: no shared pool (tts) is put in front of it and `warm_up` leaves it alone.
    Each configured engine is built by the factory its name selects (`EngineRegistry`: the installed
    entry points); a plugin that fails to import raises `plugins.PluginError` naming its package."""
    given = dict(given or {})
    unknown = set(given) - set(STAGES)
    if unknown:
        raise ValueError(f"engines: unknown stage(s) {', '.join(sorted(unknown))} (stages: {', '.join(STAGES)})")

    def timed(what: str, stage: str, name: str):
        if stage in given:
            engine = given[stage]
            progress(f"using the given {what}: {getattr(engine, 'name', type(engine).__name__)}")
            return engine
        t0 = time.perf_counter()
        engine = plugins.load_factory(stage, name)(config)   # PluginError: not installed, or fails to import
        progress(f"loaded {what}: {getattr(engine, 'name', '?')} in {time.perf_counter() - t0:.1f} s")
        return engine

    vad = timed("VAD", "vad", config.vad.engine)
    stt = timed("STT", "stt", config.stt.engine)
    llm = timed("LLM", "llm", config.llm.engine)
    tts = timed("TTS", "tts", config.tts.engine)
    turn = None
    if "turn" in given or config.turn.detector != "vad":
        turn = timed("turn model", "turn", config.turn.detector)
    return Engines(
        vad=vad, stt=stt, llm=llm,
        tts=tts if "tts" in given else scheduled_tts(tts, config),
        turn=turn,
        given=frozenset(given),
    )


async def warm_up(engines: Engines, config: Config) -> None:
    """Run each local engine once so the first caller does not pay one-time costs.

    A remote LLM is not warmed (that would cost the user tokens); its first
    turn includes connection set-up, and the ledger shows it.  The same for a
    remote STT or TTS (the endpoint warms its own engines).  An engine object given to
    `load_engines` is its owner's to warm (``engines.given``).
    """
    silence = np.zeros(16_000, np.float32)
    if engines.given:
        log.info("warm-up skips the given %s engine(s): their owner warms them", ", ".join(sorted(engines.given)))
    remote = [stage for stage, engine in (("stt", config.stt.engine), ("tts", config.tts.engine))
              if engine == REMOTE_ENGINE]
    if remote:
        log.info("warm-up skips the remote %s (%s): the first turn pays the connection set-up, and its "
                 "ledger shows it", " and ".join(remote), ", ".join(
                     getattr(engines, stage).url for stage in remote if hasattr(getattr(engines, stage), "url")))
    if "stt" not in remote and "stt" not in engines.given:
        await asyncio.to_thread(engines.stt.transcribe, silence)
    if "tts" not in remote and "tts" not in engines.given:
        await asyncio.to_thread(lambda: list(engines.tts.synthesize("Hello.")))
    if engines.turn is not None and "turn" not in engines.given:
        await asyncio.to_thread(engines.turn.probability, silence)
    if config.llm.engine == "embedded" and "llm" not in engines.given:
        # llm.system_prompt is pinned (the model's cached static prompt, models/llm_ct2.py) and the warm-up runs
        # with it, so the cache holds its state before the first request: a model node takes no calls (which pin
        # their prompt, agent/responder.py); its chat route pins other repeated ones (web/prompt_pinning.py)
        system = config.llm.system_prompt
        pin = getattr(engines.llm, "pin_system_prompt", None)
        if pin is not None and system and pin(system):
            log.info("warm-up: llm.system_prompt is pinned (%d characters)", len(system))
        warm: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        async for _ in engines.llm.stream_chat([*warm, {"role": "user", "content": "Hi"}], max_tokens=2):
            pass
