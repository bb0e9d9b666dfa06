"""Build the process-wide engines from configuration.

One registry per stage maps the configured engine name to a factory; the
rest of the code only sees the protocols in models/protocols.py.  Factories
import their engine lazily, so an engine that is not configured costs
nothing.  Each process loads its engines once and shares them between calls.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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

from .config import Config

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


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


def _espeak(c: Config) -> SpeechSynthesizer:
    from sub300.models.tts_espeak import EspeakSynthesizer

    return EspeakSynthesizer(c.tts.espeak_voice, speed_wpm=c.tts.espeak_speed_wpm)


def _smart_turn(c: Config) -> TurnCompletionModel:
    from sub300.models.turn_smart import SmartTurnModel

    return SmartTurnModel(c.turn.model, device=c.turn.device, threads=c.turn.threads)


VAD_ENGINES: dict[str, Callable[[Config], VoiceActivityDetector]] = {"webrtc": _webrtc_vad, "silero": _silero_vad}
STT_ENGINES: dict[str, Callable[[Config], SpeechRecognizer]] = {"faster-whisper": _whisper, "openai": _openai_stt}
LLM_ENGINES: dict[str, Callable[[Config], LanguageModel]] = {"embedded": _embedded_llm, "openai": _openai_llm}
TTS_ENGINES: dict[str, Callable[[Config], SpeechSynthesizer]] = {"piper": _piper, "espeak": _espeak,
                                                                  "openai": _openai_tts}
#: engines that call an endpoint: not warmed up, no local worker pool (their limiter is max_connections)
REMOTE_ENGINE = "openai"
#: turn.detector -> its turn-completion model (None: the VAD's fixed hangover alone)
TURN_MODELS: dict[str, Callable[[Config], TurnCompletionModel | None]] = {"vad": lambda c: None, "smart-turn": _smart_turn}


# ------------------------------------------------------------------ the bundle
@dataclass
class Engines:
    vad: VoiceActivityDetector
    stt: SpeechRecognizer
    llm: LanguageModel
    tts: SpeechSynthesizer
    #: the semantic end-of-turn model (turn.detector = "smart-turn"); None: the VAD's fixed hangover
    turn: TurnCompletionModel | None = None

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


def load_engines(config: Config, progress: Progress = print) -> Engines:
    """Load every configured engine (blocking: seconds on first run)."""

    def timed(what: str, factory: Callable[[Config], object]):
        t0 = time.perf_counter()
        engine = factory(config)
        progress(f"loaded {what}: {getattr(engine, 'name', '?')} in {time.perf_counter() - t0:.1f} s")
        return engine

    return Engines(
        vad=timed("VAD", VAD_ENGINES[config.vad.engine]),
        stt=timed("STT", STT_ENGINES[config.stt.engine]),
        llm=timed("LLM", LLM_ENGINES[config.llm.engine]),
        tts=scheduled_tts(timed("TTS", TTS_ENGINES[config.tts.engine]), config),
        turn=timed("turn model", TURN_MODELS[config.turn.detector]) if config.turn.detector != "vad" else None,
    )


async def warm_up(engines: Engines, config: Config) -> None:
    """Run each local engine once so the first caller does not pay one-time costs.

    A remote LLM is not warmed (that would cost the user tokens); its first
    turn includes connection set-up, and the ledger shows it.  The same for a
    remote STT or TTS (the endpoint warms its own engines).
    """
    silence = np.zeros(16_000, np.float32)
    remote = [stage for stage, engine in (("stt", config.stt.engine), ("tts", config.tts.engine))
              if engine == REMOTE_ENGINE]
    if remote:
        log.info("warm-up skips the remote %s (%s): the first turn pays the connection set-up, and its "
                 "ledger shows it", " and ".join(remote), ", ".join(
                     getattr(engines, stage).url for stage in remote if hasattr(getattr(engines, stage), "url")))
    if "stt" not in remote:
        await asyncio.to_thread(engines.stt.transcribe, silence)
    if "tts" not in remote:
        await asyncio.to_thread(lambda: list(engines.tts.synthesize("Hello.")))
    if engines.turn is not None:
        await asyncio.to_thread(engines.turn.probability, silence)
    if config.llm.engine == "embedded":
        async for _ in engines.llm.stream_chat([{"role": "user", "content": "Hi"}], max_tokens=2):
            pass
