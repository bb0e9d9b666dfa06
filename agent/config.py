"""All configuration in one place, validated once where the fields are declared.

Sources, lowest precedence first:

1. the built-in defaults below (they run offline with the bundled models);
2. a TOML file: ``--config FILE`` or ``$SUB300_CONFIG``;
3. environment variables ``SUB300_<SECTION>_<KEY>``, e.g.
   ``SUB300_STT_MODEL=/models/distil-large-v3``, ``SUB300_LLM_ENGINE=openai``;
   top-level keys as ``SUB300_<KEY>`` (``SUB300_BUDGET_MS=250``); lists
   comma-separated (``SUB300_SIP_CODECS=PCMA,PCMU``).

Every field declares its type, its unit (in its description, which
``sub300 config`` prints as a comment) and the values its engine accepts, so a
bad value stops the load with one `ConfigError` naming the dotted key, the
value and what is allowed -- not a traceback later inside an engine.  Unknown
keys are errors too, in the file and in the environment: every ``SUB300_*``
variable is a setting, except ``SUB300_CONFIG``, ``SUB300_LOG_LEVEL`` and the
secrets that a ``*_env`` key names (``SUB300_SIP_PASSWORD``, ...).

Engine defaults (thresholds, frame sizes, beam size, ...) come from
`sub300.models.defaults`, the same numbers the engines' constructors use.

Attribute assignment (``config.server.port = 0``) is not validated: it is how
programs and tests set what a user may not (port 0: any free port).  To check
a changed value, use `override`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import annotated_types
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from sub300.models import defaults

ENV_PREFIX = "SUB300_"
#: SUB300_* variables that are not settings (read by the CLI itself)
NOT_SETTINGS = frozenset({"SUB300_CONFIG", "SUB300_LOG_LEVEL"})


def http_url(url: str) -> str:
    """A remote endpoint's base URL: http:// or https://, a host, no spaces (raises ValueError)."""
    if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) == 0 or " " in url:
        raise ValueError("must be an http:// or https:// URL")
    return url


class ConfigError(ValueError):
    """The configuration is invalid; the one-line message names the key."""


# ------------------------------------------------------------------ field types
def _split_commas(value: Any) -> Any:
    """A list from the environment comes as ``a,b,c``."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _int_text(value: Any) -> Any:
    """``"20"`` from the environment for an int Literal (pydantic compares Literals exactly)."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return value
    return value


CommaList = Annotated[list[str], BeforeValidator(_split_commas)]


def _engine(stage: str, default: str) -> Any:
    """An engine name checked against the installed engines of ``stage`` (agent/plugins.py: entry points)."""

    def check(name: str) -> str:
        from .plugins import PluginError, check_name

        try:
            return check_name(stage, name, default)
        except PluginError as error:   # no engine installed at all: one line, like every other bad value
            raise ValueError(str(error)) from None

    return AfterValidator(check)


def _json_object(value: Any) -> Any:
    """``[stt.options]`` from the environment: ``SUB300_STT_OPTIONS='{"voice": "ann"}'`` (a JSON object)."""
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"must be a JSON object in the environment ({error})") from None
    return value


OptionValue = str | int | float | bool | list[str | int | float | bool]
#: a plugin engine's own settings, handed to its factory as they are (``config.stt.options``)
EngineOptions = Annotated[dict[str, OptionValue], BeforeValidator(_json_object)]


def _options_field(stage: str) -> Any:
    return Field(
        default_factory=dict,
        description=f"a plugin engine's own settings, for its factory as config.{stage}.options (TOML table "
        f"[{stage}.options]; $SUB300_{stage.upper()}_OPTIONS as a JSON object); sub300's own engines take none",
    )


def _no_options_for_builtin(stage: str, name: str, options: Mapping[str, Any]) -> None:
    """sub300's own engines read their [section] keys: options given to one would be ignored, so they are an error."""
    from .plugins import is_builtin

    if options and is_builtin(stage, name):
        raise ValueError(f"options: the built-in engine {name!r} takes no options (its settings are the keys "
                         f"of [{stage}]; [{stage}.options] is for a plugin engine)")
Device = Literal["auto", "cpu", "cuda"]
# CTranslate2's compute types; "auto" = float16 on CUDA, the engine's CPU default on CPU
ComputeType = Literal[
    "auto", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16", "float32"
]
Port = Annotated[int, Field(ge=1, le=65535)]
CODECS = ("PCMU", "PCMA")  # media/sip/g711.py


class Section(BaseModel):
    """A TOML table: unknown keys are errors; values are checked when loaded."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _options_for_a_plugin(self) -> Section:
        """An engine section's ``options`` go to a plugin's factory; a built-in engine would ignore them."""
        options = getattr(self, "options", None)
        if options:
            for name, field in type(self).model_fields.items():
                stage = (field.json_schema_extra or {}).get("engine_stage") if isinstance(
                    field.json_schema_extra, dict) else None
                if stage:
                    _no_options_for_builtin(str(stage), getattr(self, name), options)
        return self


# ------------------------------------------------------------------ sections
class ServerConfig(Section):
    """The HTTP server: demo page, WebRTC signalling, /metrics, /healthz, the OpenAI-compatible API."""

    host: str = Field(default="127.0.0.1", min_length=1, description="listen address")
    port: Port = Field(default=8080, description="listen TCP port (1..65535)")
    role: Literal["all", "media", "model"] = Field(
        default="all",
        description="all: calls and models in one process | media: calls only, engines remote (stt/llm/tts "
        "engine = openai) | model: serves its engines on /v1/audio/transcriptions, /v1/audio/speech and "
        "/v1/chat/completions, no calls",
    )
    drain_timeout_s: float = Field(
        default=30.0, ge=0.0, le=3600.0,
        description="SIGTERM: calls in progress may finish their turn and hear the goodbye within this (s); "
                    "then, or at a second SIGTERM, the rest are ended",
    )
    drain_goodbye: str = Field(
        default="I'm sorry, I have to end the call now. Goodbye!", max_length=500,
        description="said to each call in progress when the server drains ('' = hang up silently)",
    )
    audio_max_upload_bytes: int = Field(
        default=25 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024,
        description="POST /v1/audio/transcriptions: largest upload (bytes; OpenAI's limit is 25 MB); more is a 413",
    )
    audio_max_seconds: float = Field(
        default=600.0, gt=0.0, le=7200.0,
        description="POST /v1/audio/transcriptions: longest decoded audio (s); longer is a 400",
    )
    speech_max_chars: int = Field(
        default=4096, ge=1, le=1_000_000,
        description="POST /v1/audio/speech: longest 'input' (characters; OpenAI's limit is 4096); longer is a 400",
    )


class VadConfig(Section):
    """Voice activity detection and turn endpointing."""

    engine: Annotated[str, _engine("vad", "webrtc")] = Field(
        default="webrtc", description="webrtc (GMM, microseconds a frame) | silero (ONNX) | a plugin's name "
        "(entry points sub300.vad)", json_schema_extra={"engine_stage": "vad"},
    )
    options: EngineOptions = _options_field("vad")
    aggressiveness: int = Field(
        default=defaults.WEBRTC_AGGRESSIVENESS,
        ge=0,
        le=defaults.WEBRTC_AGGRESSIVENESS_MAX,
        description="webrtc: 0 (least) .. 3 (most ready to call audio unvoiced)",
    )
    frame_ms: Annotated[Literal[10, 20, 30], BeforeValidator(_int_text)] = Field(
        default=defaults.WEBRTC_FRAME_MS, description="webrtc frame: 10 | 20 | 30 (ms); silero always uses 32 ms"
    )
    threshold: float = Field(
        default=defaults.SILERO_THRESHOLD,
        gt=0.0,
        lt=1.0,
        description="silero: speech probability above which a frame is voiced (0 < x < 1)",
    )
    device: Device = Field(
        default="auto",
        description="silero: auto (ONNX Runtime's CUDA provider when onnxruntime-gpu is installed and a GPU is "
        "visible) | cpu | cuda",
    )
    min_speech_ms: int = Field(default=100, ge=0, le=5000, description="voiced audio needed to open a turn (ms)")
    hangover_ms: int = Field(
        default=250, ge=20, le=5000, description="silence after the last voiced frame that ends a turn (ms)"
    )
    pre_roll_ms: int = Field(
        default=200,
        ge=0,
        le=2000,
        description="audio kept before speech start, so the first phoneme is not clipped (ms)",
    )
    max_utterance_s: int = Field(
        default=30, ge=1, le=600, description="a longer monologue is cut into turns of at most this length (s)"
    )
    # issue 9: non-speech guard and level-relative endpointing (agent/speech_guard.py, agent/endpointing.py)
    speech_guard: bool = Field(
        default=True, description="drop turns that are tones, DTMF heard as audio, ringback, noise or music"
    )
    relative_end: bool = Field(
        default=True,
        description="end-of-speech refinement relative to the caller's own noise floor and level "
        "(false: the old fixed -55 dBFS floor)",
    )


class TurnConfig(Section):
    """End of turn: the VAD's fixed hangover, or a hangover adapted to whether the turn sounds complete."""

    detector: Annotated[str, _engine("turn", "vad")] = Field(
        default="vad",
        description="vad: every turn ends after vad.hangover_ms of silence | smart-turn: at each pause a "
        "turn-completion model (and the early transcript) choose a short or a long hangover (agent/end_of_turn.py) "
        "| a plugin's name (entry points sub300.turn)", json_schema_extra={"engine_stage": "turn"},
    )
    options: EngineOptions = _options_field("turn")
    model: str = Field(
        default="bundled:smart-turn-v3.2", min_length=1,
        description="smart-turn: the ONNX model (bundled:smart-turn-v3.2, from the pipecat-ai wheel, or a path)",
    )
    device: Device = Field(default="auto", description="smart-turn: auto | cpu | cuda (ONNX Runtime, as for Silero)")
    threads: int = Field(default=1, ge=1, le=64, description="smart-turn: ONNX Runtime CPU threads")
    threshold: float = Field(
        default=0.5, gt=0.0, lt=1.0, description="smart-turn: P(complete) at or above which the turn sounds complete"
    )
    complete_hangover_ms: int = Field(
        default=200, ge=20, le=5000,
        description="silence (from the true end of speech) that ends a turn that sounds complete (ms)",
    )
    incomplete_hangover_ms: int = Field(
        default=800, ge=20, le=10_000,
        description="silence that ends a turn that does not sound complete, or before the model has answered (ms)",
    )
    transcript: bool = Field(
        default=True,
        description="smart-turn: an early transcript ending mid-phrase (a conjunction, an article, a comma...) "
        "makes the turn incomplete",
    )


class SttConfig(Section):
    """Speech recognition: Whisper on CTranslate2 (faster-whisper), or an OpenAI-compatible endpoint."""

    engine: Annotated[str, _engine("stt", "faster-whisper")] = Field(
        default="faster-whisper",
        description="faster-whisper (in process) | openai (POST {base_url}/audio/transcriptions: vLLM, "
        "another sub300 with server.role = model, ...) | a plugin's name (entry points sub300.stt)",
        json_schema_extra={"engine_stage": "stt"},
    )
    options: EngineOptions = _options_field("stt")
    model: str = Field(
        default="bundled:whisper-tiny.en",
        min_length=1,
        description="bundled:NAME | CTranslate2 directory | hub name (see models.allow_download)",
    )
    device: Device = Field(default="auto", description="auto (CUDA when CTranslate2 sees a GPU) | cpu | cuda")
    compute_type: ComputeType = Field(
        default="auto", description="auto = float16 on CUDA, int8 on CPU | a CTranslate2 type"
    )
    cpu_threads: int = Field(default=defaults.CT2_THREADS, ge=0, le=512, description="CPU threads (0 = one per core)")
    beam_size: int = Field(
        default=defaults.WHISPER_BEAM_SIZE, ge=1, le=16, description="beam search width (1 = greedy)"
    )
    language: str = Field(
        default=defaults.WHISPER_LANGUAGE,
        description="Whisper language code, e.g. en, de ('' = detect; .en models always use en)",
    )
    # window: 5.14 % WER vs 4.92 % for full on the Asterisk set, 3.3x faster (scripts/bench_asr.py); short: 6.84 %
    padding: Literal["short", "window", "full"] = Field(
        default=defaults.WHISPER_PADDING,
        description="window: pad to max(clip + 1 s, window_s) | full: Whisper's 30 s | short: clip + 1 s",
    )
    window_s: float = Field(
        default=defaults.WHISPER_WINDOW_S,
        gt=0.0,
        le=defaults.WHISPER_MAX_WINDOW_S,
        description="padding = window: the shortest input the encoder sees (s, at most 30)",
    )
    partial_interval_ms: int = Field(
        default=1000,
        ge=0,
        le=60_000,
        description="partial transcripts while the caller speaks, this often (ms; 0 = off)",
    )
    early_final: bool = Field(
        default=True, description="start the final transcription when silence begins, not when the hangover ends"
    )
    tail_ms: int = Field(
        default=100, ge=0, le=1000,
        description="audio kept after the refined end of speech for the recogniser, so a soft last sound "
        "is not clipped (ms; issue 9)",
    )
    workers: int = Field(
        default=0, ge=0, le=64,
        description="Whisper runs at once, shared by all calls (runs; 0 = auto: 1 on CPU, 2 on CUDA); "
        "more requests wait by deadline class (models/stt_service.py)",
    )
    max_batch: int = Field(
        default=0, ge=0, le=64,
        description="final transcriptions that wait together go into one batched Whisper call, at most this "
        "many (requests; 1 = no batching; 0 = auto: 1 on CPU, 8 on CUDA; scripts/bench_stt_batch.py)",
    )

    base_url: str = Field(
        default="http://127.0.0.1:8081/v1", description="openai: endpoint base URL (http:// or https://, up to /v1)"
    )
    remote_model: str = Field(default="whisper-1", min_length=1, description="openai: the model name to request")
    api_key_env: str = Field(
        default="SUB300_STT_API_KEY", description="openai: environment variable that holds the API key"
    )
    connect_timeout_s: float = Field(
        default=defaults.OPENAI_CONNECT_TIMEOUT_S, gt=0.0, le=600.0, description="openai: connection set-up limit (s)"
    )
    response_timeout_s: float = Field(
        default=10.0, gt=0.0, le=600.0, description="openai: limit on the wait for the whole answer (s)"
    )
    retries: int = Field(
        default=1, ge=0, le=10,
        description="openai: retries of a request that failed before the endpoint began to answer "
        "(refused connection, 502/503/504)",
    )
    max_connections: int = Field(
        default=64, ge=1, le=100_000, description="openai: requests open at once (more wait, by deadline class)"
    )

    _http_url = field_validator("base_url")(classmethod(lambda cls, url: http_url(url)))

    @field_validator("language")
    @classmethod
    def _language(cls, code: str) -> str:
        if code and not (code.isascii() and code.isalpha() and code.islower() and 2 <= len(code) <= 3):
            raise ValueError("must be a Whisper language code (2 or 3 lower-case letters: en, de, yue) or '' to detect")
        return code


class LlmConfig(Section):
    """The language model: embedded (CTranslate2, in process) or any OpenAI-compatible endpoint."""

    engine: Annotated[str, _engine("llm", "embedded")] = Field(
        default="embedded", description="embedded (CTranslate2) | openai (HTTP endpoint) | a plugin's name "
        "(entry points sub300.llm)", json_schema_extra={"engine_stage": "llm"},
    )
    options: EngineOptions = _options_field("llm")
    model: str = Field(
        default="bundled:smollm2-135m-gguf",
        min_length=1,
        description="embedded: bundled:NAME | .gguf file | CTranslate2 directory",
    )
    device: Device = Field(default="auto", description="embedded: auto | cpu | cuda")
    compute_type: ComputeType = Field(
        default="auto", description="embedded: auto = float16 on CUDA, float32 on CPU (int8 drifts on the 135M model)"
    )
    threads: int = Field(
        default=defaults.CT2_THREADS, ge=0, le=512, description="embedded: CPU threads (0 = one per core)"
    )
    max_batch: int = Field(
        default=0, ge=0, le=1024,
        description="embedded: requests decoded together at most (0 = auto: 8 on CPU, 32 on CUDA)",
    )
    max_tokens: int = Field(default=60, ge=1, le=8192, description="longest reply (tokens)")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="sampling temperature (0 = greedy)")
    system_prompt: str = Field(
        # Measured on the bundled SmolLM2-135M (12 questions): this wording kept it
        # in English; "voice assistant ... Always answer in English" drifted into French.
        default="You are a helpful assistant. Answer the question briefly in plain English.",
        description="the system message of every conversation",
    )
    base_url: str = Field(
        default="http://127.0.0.1:8000/v1", description="openai: endpoint base URL (http:// or https://, up to /v1)"
    )
    remote_model: str = Field(default="default", min_length=1, description="openai: the model name to request")
    api_key_env: str = Field(
        default="OPENAI_API_KEY", description="openai: environment variable that holds the API key"
    )
    connect_timeout_s: float = Field(
        default=defaults.OPENAI_CONNECT_TIMEOUT_S, gt=0.0, le=600.0, description="openai: connection set-up limit (s)"
    )
    first_token_timeout_s: float = Field(
        default=defaults.OPENAI_FIRST_TOKEN_TIMEOUT_S,
        gt=0.0,
        le=600.0,
        description="openai: limit on the wait for the first token (s)",
    )
    idle_timeout_s: float = Field(
        default=10.0, gt=0.0, le=600.0,
        description="openai: limit on a silent gap in the stream after the first token (s); then the turn fails",
    )
    max_connections: int = Field(
        default=256, ge=1, le=100_000,
        description="openai: streams open at once, one HTTP connection each (vLLM/SGLang batch them); more wait",
    )
    history_turns: int = Field(default=8, ge=0, le=1000, description="past exchanges kept in the prompt")
    api_max_tokens: int = Field(
        default=1024, ge=1, le=1_000_000,
        description="/v1/chat/completions: largest max_tokens accepted (tokens; more is a 400)",
    )
    speculate: bool = Field(
        default=True, description="start the LLM (and TTS) on the early transcript, before the hangover ends"
    )
    fallback_text: str = Field(
        default="Sorry, I can't answer that right now.",
        max_length=300,
        description="spoken when the LLM fails or says nothing (after what was already spoken); empty = silence",
    )
    tool_timeout_s: float = Field(
        default=5.0, gt=0.0, le=600.0,
        description="tools: a call's limit (s) when its tool sets none; then the model is told it timed out",
    )
    max_tool_rounds: int = Field(
        default=3, ge=1, le=32,
        description="tools: rounds of tool calls in one turn at most; a model that asks again fails the turn",
    )
    tool_filler_ms: int = Field(
        default=700, ge=0, le=60_000,
        description="tools: running longer than this (ms) with nothing said yet, the agent says tool_filler_text",
    )
    tool_filler_text: str = Field(
        default="One moment.", max_length=200,
        description="tools: the filler spoken while a slow tool runs; empty = none",
    )

    _http_url = field_validator("base_url")(classmethod(lambda cls, url: http_url(url)))


class TtsConfig(Section):
    """Speech synthesis: Piper (GPL-3.0), espeak-ng, Coqui TTS, or an OpenAI-compatible endpoint."""

    engine: Annotated[str, _engine("tts", "piper")] = Field(
        default="piper",
        description="piper (GPL-3.0) | espeak | coqui (extra sub300[coqui]: XTTS streamed, VITS by sentence) | openai (POST {base_url}/audio/speech, streamed PCM: another "
        "sub300 with server.role = model, ...) | a plugin's name (entry points sub300.tts)",
        json_schema_extra={"engine_stage": "tts"},
    )
    options: EngineOptions = _options_field("tts")
    voice: str = Field(default=defaults.PIPER_VOICE, min_length=1, description="piper: bundled:NAME | .onnx path")
    threads: int = Field(
        default=defaults.PIPER_THREADS,
        ge=1,
        le=64,
        description="piper: ONNX threads per synthesis (the LLM pauses while the first piece is made); "
        "coqui: PyTorch CPU threads",
    )
    device: Device = Field(
        default="auto",
        description="piper: auto (ONNX Runtime's CUDA provider when onnxruntime-gpu is installed and a GPU is "
        "visible) | cpu | cuda; coqui: auto (CUDA when PyTorch sees a GPU) | cpu | cuda",
    )
    workers: int = Field(
        default=0, ge=0, le=64,
        description="syntheses at once for all calls, first pieces first (0 = auto: 1, as one Piper run "
        "already uses every core)",
    )
    coqui_model: str = Field(
        default="tts_models/multilingual/multi-dataset/xtts_v2", min_length=1,
        description="coqui: a model folder (config.json + checkpoint) | a Coqui name tts_models/<lang>/<dataset>/"
        "<model> (see models.allow_download)",
    )
    coqui_speaker: str = Field(
        default="", description="coqui: a speaker of a multi-speaker model (XTTS: of its speaker file; empty = the first)"
    )
    coqui_speaker_wav: str = Field(
        default="", description="coqui, XTTS: a recording (any format PyAV reads) to clone the voice from"
    )
    coqui_language: str = Field(default="", description="coqui: language of a multilingual model (XTTS: empty = en)")
    coqui_stream_chunk_size: int = Field(
        default=defaults.COQUI_STREAM_CHUNK_SIZE, ge=1, le=400,
        description="coqui, XTTS: GPT audio tokens per streamed chunk (fewer: sooner first audio, more decoder runs)",
    )
    espeak_voice: str = Field(
        default=defaults.ESPEAK_VOICE, min_length=1, description="espeak: voice name (espeak-ng --voices)"
    )
    espeak_speed_wpm: int = Field(
        default=defaults.ESPEAK_SPEED_WPM,
        ge=defaults.ESPEAK_SPEED_WPM_MIN,
        le=defaults.ESPEAK_SPEED_WPM_MAX,
        description="espeak: speaking rate (words per minute)",
    )
    base_url: str = Field(
        default="http://127.0.0.1:8081/v1", description="openai: endpoint base URL (http:// or https://, up to /v1)"
    )
    remote_model: str = Field(default="tts-1", min_length=1, description="openai: the model name to request")
    remote_voice: str = Field(default="alloy", min_length=1, description="openai: the voice to request")
    remote_sample_rate: int = Field(
        default=24_000, ge=8_000, le=48_000,
        description="openai: rate of the raw 16-bit PCM the endpoint streams (Hz; OpenAI's pcm format is 24000)",
    )
    api_key_env: str = Field(
        default="SUB300_TTS_API_KEY", description="openai: environment variable that holds the API key"
    )
    connect_timeout_s: float = Field(
        default=defaults.OPENAI_CONNECT_TIMEOUT_S, gt=0.0, le=600.0, description="openai: connection set-up limit (s)"
    )
    first_byte_timeout_s: float = Field(
        default=10.0, gt=0.0, le=600.0, description="openai: limit on the wait for the first audio (s)"
    )
    idle_timeout_s: float = Field(
        default=10.0, gt=0.0, le=600.0, description="openai: limit on a silent gap in the audio stream (s)"
    )
    retries: int = Field(
        default=1, ge=0, le=10,
        description="openai: retries of a request that failed before any audio came (refused connection, "
        "502/503/504); never once audio has been played",
    )
    max_connections: int = Field(
        default=64, ge=1, le=100_000, description="openai: syntheses open at once (more wait, by deadline class)"
    )
    _http_url = field_validator("base_url")(classmethod(lambda cls, url: http_url(url)))

    @model_validator(mode="after")
    def _one_coqui_voice(self) -> TtsConfig:
        if self.coqui_speaker and self.coqui_speaker_wav:
            raise ValueError("coqui_speaker and coqui_speaker_wav are both set: a speaker of the model's, or a "
                             "recording to clone, not both")
        return self

    min_clause_chars: int = Field(
        default=12, ge=0, le=1000, description="a clause shorter than this waits for more text before TTS (characters)"
    )
    first_piece_max_words: int = Field(
        # scripts/bench_first_piece.py (issue 11): 3 words start the voice ~210 ms sooner than 6 at
        # p50, with the same words heard back and an 85 ms pause at the seam (p50)
        default=3,
        ge=0,
        le=100,
        description="first piece: cut after this many words if no punctuation came (words; 0 = off)",
    )


class InterruptConfig(Section):
    """Barge-in: when caller speech pauses, stops or resumes the agent's reply."""

    mode: Literal["barge_in", "half_duplex"] = Field(
        default="barge_in", description="barge_in | half_duplex (ignore the caller while the agent speaks)"
    )
    onset_ms: int = Field(default=60, ge=10, le=2000, description="voiced audio that pauses the agent at once (ms)")
    min_speech_ms: int = Field(
        default=300,
        ge=0,
        le=5000,
        description="voiced caller speech that interrupts at once; shorter speech: its words decide (ms)",
    )
    require_words: bool = Field(
        default=False, description="... and only if the speech transcribes to at least one word"
    )
    resume_after_ms: int = Field(
        default=600, ge=50, le=10_000, description="a pause this long after a false start resumes the agent (ms)"
    )
    echo_guard: bool = Field(default=True, description="ignore caller audio that is the agent's own voice coming back")
    echo_correlation: float = Field(
        default=0.6,
        gt=0.0,
        le=1.0,
        description="normalised correlation with recently played audio above which it is echo (0 < x <= 1)",
    )


class WebRtcConfig(Section):
    """WebRTC calls from the demo page: ICE servers and the call limit."""

    stun_urls: CommaList = Field(
        default_factory=list, description="STUN servers (stun:host:port); empty = host candidates only"
    )
    turn_urls: CommaList = Field(default_factory=list, description="TURN servers (turn:host:port?transport=udp)")
    turn_username: str = Field(default="", description="TURN user name")
    turn_credential_env: str = Field(
        default="SUB300_TURN_CREDENTIAL", description="environment variable that holds the TURN secret"
    )
    turn_secret_env: str = Field(
        default="SUB300_TURN_SECRET",
        description="environment variable with the TURN REST API shared secret (coturn static-auth-secret); "
                    "when set, the page gets short-lived TURN credentials minted from it instead of turn_username",
    )
    turn_credential_ttl_s: int = Field(
        default=3600, ge=60, le=86_400, description="lifetime of minted TURN credentials (s)"
    )
    max_calls: int = Field(
        default=8, ge=1, le=10_000,
        description="WebRTC calls at once, a cap for this transport within admission.max_calls (then 503)",
    )
    # a caller gone without a goodbye: RTP stops at once, ICE consent (RFC 7675) fails only after ~30 s
    no_media_timeout_s: float = Field(
        default=10.0, gt=0.0, le=3600.0, description="no RTP from the caller for this long ends the call (s)"
    )
    connect_timeout_s: float = Field(
        default=20.0, gt=0.0, le=600.0, description="an answered offer must connect (ICE+DTLS) within this (s)"
    )
    # aiortc's audio jitter buffer holds 4 frames (80 ms) before releasing one (media/webrtc/jitter.py)
    jitter_prefetch_frames: int = Field(
        default=0, ge=0, le=8,
        description="frames the caller's audio waits in our jitter buffer before the VAD hears it "
                    "(20 ms each; 0 = none, a packet later than its successor is dropped; aiortc's own is 4)",
    )

    @field_validator("stun_urls", "turn_urls")
    @classmethod
    def _ice_urls(cls, urls: list[str], info) -> list[str]:
        scheme = ("stun:", "stuns:") if info.field_name == "stun_urls" else ("turn:", "turns:")
        for url in urls:
            if not url.startswith(scheme):
                raise ValueError(f"{url!r} does not start with {' or '.join(scheme)}")
        return urls


class SipConfig(Section):
    """The SIP user agent (UDP and TCP) for calls from a PBX or SIP trunk."""

    enabled: bool = Field(default=False, description="listen for SIP")
    host: str = Field(default="127.0.0.1", min_length=1, description="SIP listen address (UDP and TCP)")
    port: Port = Field(default=5060, description="SIP listen port (1..65535)")
    public_address: str = Field(default="", description="address written into SDP/Contact ('' = host)")
    rtp_port_min: int = Field(default=20000, ge=1024, le=65535, description="lowest RTP port (even ports are used)")
    rtp_port_max: int = Field(default=20999, ge=1024, le=65535, description="highest RTP port")
    max_calls: int = Field(
        default=8, ge=1, le=10_000,
        description="SIP calls at once, ringing ones included: a cap for this transport within admission.max_calls "
        "(then 503 with Retry-After)",
    )
    allowed_sources: CommaList = Field(
        default_factory=lambda: ["127.0.0.1/32"],
        description="CIDRs allowed to INVITE (empty = anyone: use digest auth)",
    )
    auth_username: str = Field(default="", description="digest auth for INVITE when set")
    auth_password_env: str = Field(
        default="SUB300_SIP_PASSWORD", description="environment variable that holds the digest password"
    )
    realm: str = Field(default="sub300", min_length=1, description="digest auth realm")
    nonce_ttl_s: float = Field(
        default=300.0, ge=1.0, le=3600.0, description="seconds a digest nonce stays valid (then 401 stale=true)"
    )
    max_nonces: int = Field(
        default=4096, ge=16, le=1_000_000, description="digest nonces remembered at once (oldest forgotten first)"
    )
    # SIP over TCP (media/sip/transport.py): held-open connections must not eat the file limit
    tcp_message_timeout_s: float = Field(
        default=10.0, gt=0.0, le=300.0, description="seconds a TCP connection has to finish a message once begun"
    )
    tcp_idle_timeout_s: float = Field(
        default=180.0, gt=0.0, le=3600.0,
        description="seconds a TCP connection without a call may stay silent between messages (RFC 5626 keep-alives reset it)",
    )
    tcp_max_connections: int = Field(default=256, ge=1, le=65_536, description="open SIP TCP connections in total")
    tcp_max_connections_per_source: int = Field(
        default=32, ge=1, le=65_536, description="open SIP TCP connections from one IP address"
    )
    max_message_bytes: int = Field(
        default=65_536, ge=1024, le=1_048_576, description="largest SIP message in bytes, UDP or TCP (then dropped, or 513)"
    )
    codecs: CommaList = Field(
        default_factory=lambda: list(CODECS),
        min_length=1,
        description="offered codecs, in order of preference: PCMU, PCMA",
    )
    on_resume: Literal["continue", "drop"] = Field(
        default="continue",
        description="after a hold (re-INVITE sendonly/inactive/c=0.0.0.0, RFC 3264 §8.4): continue the agent's "
        "reply where it stopped, or drop the rest (history keeps what was heard)",
    )
    rtp_latching: Literal["off", "nat", "always"] = Field(
        default="nat",
        description="RTP source: off = only the SDP's address; nat = latch once onto the first source when the SDP "
        "address is private/CGNAT/0.0.0.0 (behind NAT); always = latch once onto the first source",
    )

    @field_validator("allowed_sources")
    @classmethod
    def _cidrs(cls, cidrs: list[str]) -> list[str]:
        for cidr in cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an IP network (e.g. 10.0.0.0/8)") from None
        return cidrs

    @field_validator("codecs")
    @classmethod
    def _codecs(cls, codecs: list[str]) -> list[str]:
        unknown = [c for c in codecs if c not in CODECS]
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a codec of media/sip (one of {', '.join(CODECS)})")
        return codecs

    @model_validator(mode="after")
    def _rtp_range(self) -> SipConfig:
        # RTP goes on even ports (media/sip/rtp.py): the range must hold one
        if self.rtp_port_min + (self.rtp_port_min & 1) > self.rtp_port_max:
            raise ValueError(
                f"rtp_port_min..rtp_port_max = {self.rtp_port_min}..{self.rtp_port_max} is not allowed: "
                "the range must contain an even port (RTP uses even ports)"
            )
        return self


class CallConfig(Section):
    """Limits on every call (WebRTC and SIP; see agent/call_limits.py): the agent says goodbye and hangs up."""

    inactivity_timeout_s: float = Field(
        default=60.0, ge=0.0, le=86_400.0, description="no caller speech for this long ends the call (s; 0 = off)"
    )
    max_duration_s: float = Field(
        default=3600.0, ge=0.0, le=604_800.0, description="longest call (s; 0 = off)"
    )
    inactivity_goodbye: str = Field(
        default="I haven't heard anything for a while, so I'll hang up now. Goodbye!", max_length=500,
        description="said before hanging up on a silent caller ('' = hang up silently)",
    )
    max_duration_goodbye: str = Field(
        default="We have reached the time limit for this call. Goodbye!", max_length=500,
        description="said before hanging up at max_duration_s ('' = hang up silently)",
    )


class AdmissionConfig(Section):
    """Admission of new calls, WebRTC and SIP together (agent/admission.py): capacity and the queue-wait guard."""

    max_calls: int | Literal["auto"] = Field(
        default=8,
        description="calls at once, WebRTC and SIP together (then 503 with Retry-After) | auto: the load "
        "benchmark's capacity_file, else capacity_calls, else a per-device guess (logged as a guess); "
        "webrtc.max_calls and sip.max_calls still cap each transport",
    )
    capacity_calls: int = Field(
        default=0, ge=0, le=100_000,
        description="max_calls = auto: the capacity when no capacity_file exists (calls; 0 = unset)",
    )
    capacity_file: str = Field(
        default="",
        description="max_calls = auto: the JSON that scripts/bench_load.py --write-capacity writes "
        "('' = <models.cache_dir>/capacity.json)",
    )
    max_queue_wait_ms: float = Field(
        default=500.0, ge=0.0, le=600_000.0,
        description="refuse new calls while the p95 of recent turns' committed engine queue wait "
        "(STT + LLM + TTS, per turn) is above this (ms; 0 = off); calls in progress are untouched",
    )
    window_turns: int = Field(
        default=20, ge=1, le=100_000, description="the queue-wait guard's window: the last this many turns (turns)"
    )
    window_s: float = Field(
        default=30.0, gt=0.0, le=86_400.0,
        description="... no older than this, so the guard recovers once the turns that tripped it age out (s)",
    )
    min_turns: int = Field(
        default=5, ge=1, le=100_000, description="the guard judges only with at least this many turns in its window"
    )
    retry_after_s: int = Field(
        default=5, ge=1, le=86_400, description="Retry-After of a refusal, HTTP 503 and SIP 503 (s)"
    )

    @field_validator("max_calls", mode="before")
    @classmethod
    def _max_calls(cls, value: Any) -> int | str:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            calls = int(value) if not isinstance(value, bool | float) else None
        except (TypeError, ValueError):
            calls = None
        if calls is None or not 1 <= calls <= 100_000:
            raise ValueError("expected 'auto' or a number of calls, 1 <= x <= 100000")
        return calls

    @model_validator(mode="after")
    def _window(self) -> AdmissionConfig:
        if self.min_turns > self.window_turns:
            raise ValueError(
                f"min_turns = {self.min_turns} is not allowed: the window holds at most window_turns = "
                f"{self.window_turns} turns"
            )
        return self


class AuthConfig(Section):
    """Who may call: API keys with scopes, short-lived call tokens, limits per key and per source (agent/auth)."""

    required: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="auto: required unless server.host is a loopback address | on | off (said at start-up)",
    )
    token_secret_env: str = Field(
        default="SUB300_TOKEN_SECRET",
        description="environment variable with the secret that signs call tokens (empty: a random one per "
                    "process, so tokens do not survive a restart or cross nodes; logged)",
    )
    call_token_ttl_s: int = Field(default=300, ge=10, le=86_400, description="lifetime of a call token (s)")
    key_calls_per_minute: int = Field(
        default=60, ge=0, le=1_000_000, description="new calls per API key per minute (0 = no limit; then 429)"
    )
    key_max_concurrent_calls: int = Field(
        default=0, ge=0, le=100_000, description="calls at once per API key (0 = only the admission's limit)"
    )
    key_model_requests_per_minute: int = Field(
        default=600, ge=0, le=1_000_000, description="/v1/* model requests per API key per minute (0 = no limit)"
    )
    source_calls_per_minute: int = Field(
        default=30, ge=0, le=1_000_000, description="new calls per source address per minute (0 = no limit)"
    )
    source_max_concurrent_calls: int = Field(
        default=0, ge=0, le=100_000, description="calls at once per source address (0 = no limit)"
    )
    source_model_requests_per_minute: int = Field(
        default=600, ge=0, le=1_000_000, description="model requests per source address per minute (0 = no limit)"
    )
    sip_invites_per_minute: int = Field(
        default=60, ge=0, le=1_000_000, description="SIP: new INVITEs per source address per minute (0 = no limit)"
    )
    trusted_proxies: CommaList = Field(
        default_factory=list,
        description="CIDRs of reverse proxies / load balancers whose X-Forwarded-For names the caller "
                    "(the source of the per-source limits and records); empty = the TCP peer is the source",
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, cidrs: list[str]) -> list[str]:
        for cidr in cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an IP network (e.g. 10.0.0.0/8)") from None
        return cidrs


REDACTIONS = ("card", "phone", "email")  # agent/records/redaction.py


class RecordsConfig(Section):
    """What each call leaves behind: durable call/turn/usage records (agent/records), retention, redaction."""

    enabled: bool = Field(default=True, description="write call, turn and usage records")
    url: str = Field(
        default="",
        description="SQLAlchemy URL: sqlite:///PATH (WAL) or postgresql+psycopg://… "
                    "('' = sqlite:///<$XDG_STATE_HOME or ~/.local/state>/sub300/records.db)",
    )
    retention_days: float = Field(
        default=30.0, ge=0.0, le=36_500.0,
        description="transcripts, replies and recordings older than this are deleted (days; 0 = keep forever); "
                    "usage quantities are kept",
    )
    record_audio: bool = Field(
        default=False, description="record every call's audio (a key can also ask for it); off: nothing recorded"
    )
    recordings_dir: str = Field(
        default="", description="where recordings go ('' = beside the SQLite file, or <state dir>/recordings)"
    )
    redact: CommaList = Field(
        default_factory=lambda: ["card", "phone", "email"],
        description="what is masked in stored transcripts and in logs: card | phone | email (empty = nothing)",
    )

    @field_validator("redact")
    @classmethod
    def _redact(cls, kinds: list[str]) -> list[str]:
        for kind in kinds:
            if kind not in REDACTIONS:
                raise ValueError(f"{kind!r} is not one of {', '.join(REDACTIONS)}")
        return kinds


class TelemetryConfig(Section):
    """Traces and logs: OpenTelemetry over OTLP/HTTP, plain or JSON log lines."""

    otlp_endpoint: str = Field(
        default="", description="OTLP/HTTP traces endpoint, e.g. http://127.0.0.1:4318/v1/traces ('' = no traces)"
    )
    service_name: str = Field(default="sub300", min_length=1, description="OpenTelemetry service.name")
    log_format: Literal["plain", "json"] = Field(
        default="plain", description="plain: one line for a terminal | json: one object per line with call_id, turn, key_id"
    )


class ModelsConfig(Section):
    """Where models are converted to and whether the hub may be used."""

    cache_dir: str = Field(
        default="~/.cache/sub300", min_length=1, description="converted models (GGUF -> CTranslate2)"
    )
    allow_download: bool = Field(default=False, description="hub names load only from the local cache unless true")


class Config(BaseSettings):
    """The whole configuration: two top-level keys and one section per table."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="_",
        env_nested_max_split=1,  # SUB300_VAD_HANGOVER_MS -> vad.hangover_ms, not vad.hangover.ms
        enable_decoding=False,  # lists are comma-separated, not JSON
        case_sensitive=False,
        extra="forbid",
    )

    budget_ms: int = Field(default=300, ge=1, le=60_000, description="voice-to-voice target per turn (ms)")
    hangup_phrases: CommaList = Field(
        default_factory=lambda: ["goodbye", "good bye", "bye", "hang up"],
        description="the agent hangs up after answering a turn that contains one of these",
    )
    server: ServerConfig = Field(default_factory=lambda: ServerConfig())
    vad: VadConfig = Field(default_factory=lambda: VadConfig())
    turn: TurnConfig = Field(default_factory=lambda: TurnConfig())
    stt: SttConfig = Field(default_factory=lambda: SttConfig())
    llm: LlmConfig = Field(default_factory=lambda: LlmConfig())
    tts: TtsConfig = Field(default_factory=lambda: TtsConfig())
    interrupt: InterruptConfig = Field(default_factory=lambda: InterruptConfig())
    webrtc: WebRtcConfig = Field(default_factory=lambda: WebRtcConfig())
    sip: SipConfig = Field(default_factory=lambda: SipConfig())
    call: CallConfig = Field(default_factory=lambda: CallConfig())
    admission: AdmissionConfig = Field(default_factory=lambda: AdmissionConfig())
    auth: AuthConfig = Field(default_factory=lambda: AuthConfig())
    records: RecordsConfig = Field(default_factory=lambda: RecordsConfig())
    telemetry: TelemetryConfig = Field(default_factory=lambda: TelemetryConfig())
    models: ModelsConfig = Field(default_factory=lambda: ModelsConfig())

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        # `load_config` reads the file and the environment itself, so that
        # tests can pass their own; `Config()` alone is the built-in defaults.
        return (init_settings,)

    @property
    def cache_path(self) -> Path:
        return Path(os.path.expanduser(self.models.cache_dir))


def _sections() -> dict[str, type[Section]]:
    return {
        name: f.annotation
        for name, f in Config.model_fields.items()
        if isinstance(f.annotation, type) and issubclass(f.annotation, Section)
    }


# ------------------------------------------------------------------ sources
class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping instead of os.environ."""

    def __init__(self, environ: Mapping[str, str]):
        self._environ = environ
        super().__init__(Config)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in self._environ.items()}


def _read_toml(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config file {path}: {e}") from None


def _secret_names(file_data: Mapping[str, Any], environ: Mapping[str, str]) -> set[str]:
    """Environment variables named by ``*_env`` keys: secrets, not settings."""
    names: set[str] = set()
    for section, model in _sections().items():
        for key, field in model.model_fields.items():
            if key.endswith("_env"):
                from_file = file_data.get(section, {}).get(key) if isinstance(file_data.get(section), dict) else None
                from_env = environ.get(f"{ENV_PREFIX}{section}_{key}".upper())
                names.update(str(v).upper() for v in (field.default, from_file, from_env) if v)
    return names


def _settings_environ(environ: Mapping[str, str], file_data: Mapping[str, Any]) -> dict[str, str]:
    """The SUB300_* variables that are settings; an unknown section is an error."""
    skip = NOT_SETTINGS | _secret_names(file_data, environ)
    top_level = set(Config.model_fields) - set(_sections())
    out = {}
    for name, value in environ.items():
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in skip:
            continue
        rest = upper[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        if rest not in top_level and (section not in _sections() or not key):
            raise ConfigError(
                f"environment variable {name}: no such setting "
                f"(SUB300_<SECTION>_<KEY> with a section of {', '.join(_sections())}, "
                f"or SUB300_{'/'.join(k.upper() for k in sorted(top_level))})"
            )
        out[name] = value
    return out


def _merge(low: Mapping[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(low)
    for key, value in high.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------ errors
def _field(loc: tuple) -> Any:
    """The FieldInfo at a pydantic error location (a list item: the list's), or None."""
    section = _sections().get(str(loc[0])) if len(loc) > 1 else None
    model, key = (section, loc[1]) if section else (Config, loc[0])
    return model.model_fields.get(key) if isinstance(key, str) else None


def _allowed(field: Any) -> str:
    """What a field accepts, in words: 'an integer, 20 <= x <= 5000', "one of 'a', 'b'"."""
    annotation = field.annotation
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(v) for v in get_args(annotation))
    if get_origin(annotation) is list:
        (item,) = get_args(annotation)
        size = "a non-empty list" if any(isinstance(m, annotated_types.MinLen) for m in field.metadata) else "a list"
        if get_origin(item) is Literal:
            return f"{size} of " + ", ".join(repr(v) for v in get_args(item))
        return f"{size} (comma-separated in the environment)"
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        annotation, str(annotation)
    )
    if annotation is str and any(isinstance(m, annotated_types.MinLen) for m in field.metadata):
        kind = "a non-empty string"
    low = high = ""
    for m in field.metadata:
        if isinstance(m, annotated_types.Gt):
            low = f"{m.gt:g} < "
        elif isinstance(m, annotated_types.Ge):
            low = f"{m.ge:g} <= "
        elif isinstance(m, annotated_types.Lt):
            high = f" < {m.lt:g}"
        elif isinstance(m, annotated_types.Le):
            high = f" <= {m.le:g}"
    if low or high:
        return f"{kind}, {low}x{high}"
    return kind


def _origin(loc: tuple, environ: Mapping[str, str], file_data: Mapping[str, Any], path: Any) -> str:
    name = ENV_PREFIX + "_".join(str(p) for p in loc[:2]).upper()
    if any(k.upper() == name for k in environ):
        return f" (from ${name})"
    node: Any = file_data
    for part in loc[:2]:
        if not isinstance(node, Mapping) or part not in node:
            return ""
        node = node[part]
    return f" (from {path})" if path else ""


def _describe(error: ValidationError, environ: Mapping[str, str], file_data: Mapping[str, Any], path: Any) -> str:
    """One line for all that is wrong: key, value, where it came from, what is allowed."""
    problems = []
    for e in error.errors(include_url=False):
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        origin = _origin(loc, environ, file_data, path)
        if e["type"] == "extra_forbidden":
            parent = Config if len(loc) == 1 else _sections().get(str(loc[0]))
            known = ", ".join(parent.model_fields) if parent else ""
            problems.append(
                f"{key}{origin}: unknown key (known{' in [' + str(loc[0]) + ']' if len(loc) > 1 else ''}: {known})"
            )
        elif e["type"] in ("model_type", "model_attributes_type", "dict_type"):
            problems.append(f"{key}{origin}: expected a table ([{key}]), got {e['input']!r}")
        elif e["type"] == "value_error":
            message = str(e["ctx"]["error"]) if "ctx" in e else e["msg"]
            if len(loc) == 1 and loc[0] in _sections():  # a check across a section's keys
                problems.append(f"{key}.{message}")
            else:
                problems.append(f"{key} = {e['input']!r}{origin} is not allowed: {message}")
        else:
            field = _field(loc)
            allowed = _allowed(field) if field is not None else e["msg"].replace("Input should be", "must be")
            problems.append(f"{key} = {e['input']!r}{origin} is not allowed: expected {allowed}")
    return "; ".join(problems)


def _validated(data: Mapping[str, Any], environ: Mapping[str, str], file_data: Mapping[str, Any], path: Any) -> Config:
    try:
        return Config(**data)
    except ValidationError as error:
        raise ConfigError(_describe(error, environ, file_data, path)) from None


# ------------------------------------------------------------------ API
def load_config(path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Defaults < the TOML file (`path` or ``$SUB300_CONFIG``) < ``SUB300_*`` variables of `environ`."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("SUB300_CONFIG") or None
    file_data = _read_toml(path) if path else {}
    settings = _settings_environ(environ, file_data)
    env_data = _Environment(settings)()
    return _validated(_merge(file_data, env_data), settings, file_data, path)


def override(config: Config, values: Mapping[str, Any], origin: str | None = None) -> Config:
    """A checked copy of `config` with `values` (``{"vad": {"hangover_ms": 300}}``) on top."""
    return _validated(_merge(config.model_dump(), values), {}, values, origin)


def to_toml(config: Config, comments: bool = True) -> str:
    """The effective configuration, as a TOML file one could load back (descriptions as comments)."""

    def fmt(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        if isinstance(value, list):
            return "[" + ", ".join(fmt(v) for v in value) + "]"
        if isinstance(value, dict):   # an inline table: [stt.options] = {"voice" = "ann"}
            return "{" + ", ".join(f"{fmt(str(k))} = {fmt(v)}" for k, v in value.items()) + "}"
        return repr(value)

    def entries(model: BaseModel) -> list[str]:
        lines = []
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                continue
            if comments and field.description:
                lines.append(f"# {field.description}")
            stage = field.json_schema_extra.get("engine_stage") if isinstance(field.json_schema_extra, dict) else None
            if comments and stage:   # the choices of an engine field: the installed entry points
                from .plugins import engine_names

                lines.append(f"# installed: {', '.join(engine_names(str(stage), str(field.default)))}")
            lines.append(f"{name} = {fmt(value)}")
        return lines

    lines = entries(config)
    for name in _sections():
        section = getattr(config, name)
        lines.append("")
        doc = (type(section).__doc__ or "").strip()
        if comments and doc:
            lines.append(f"# {doc.splitlines()[0]}")
        lines.append(f"[{name}]")
        lines.extend(entries(section))
    return "\n".join(lines) + "\n"
