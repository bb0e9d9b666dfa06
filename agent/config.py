"""All configuration in one place.

Precedence: built-in defaults (which run offline with the bundled models)
< a TOML file (``--config`` or ``$SUB300_CONFIG``) < environment variables
``SUB300_<SECTION>_<KEY>`` (e.g. ``SUB300_STT_MODEL=/models/distil-large-v3``,
``SUB300_LLM_ENGINE=openai``).  Unknown keys and bad values are errors, not
silently ignored.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "SUB300_"


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080


@dataclass
class VadConfig:
    engine: str = "webrtc"            # webrtc | silero
    aggressiveness: int = 3           # webrtcvad 0..3
    frame_ms: int = 20                # webrtcvad frame: 10 | 20 | 30
    threshold: float = 0.5            # silero speech probability
    min_speech_ms: int = 100          # voiced audio needed to open a turn
    hangover_ms: int = 250            # silence after the last voiced frame that ends a turn
    pre_roll_ms: int = 200            # audio kept before speech start, so the first phoneme is not clipped
    max_utterance_s: int = 30         # a longer monologue is cut into turns of at most this length


@dataclass
class SttConfig:
    engine: str = "faster-whisper"
    model: str = "bundled:whisper-tiny.en"   # bundled:NAME | CT2 dir | hub name
    device: str = "auto"              # auto | cpu | cuda
    compute_type: str = "auto"        # auto = float16 on CUDA, int8 on CPU
    cpu_threads: int = 0              # 0 = all cores
    beam_size: int = 1
    language: str = "en"
    # window: pad to max(clip + 1 s, window_s) — 5.14 % WER vs 4.92 % for full on the Asterisk set,
    # 3.3x faster (scripts/bench_asr.py); full: Whisper's 30 s; short: clip + 1 s (6.84 %)
    padding: str = "window"
    window_s: float = 12.0
    partial_interval_ms: int = 1000   # partial transcripts while the caller speaks (0 = off)
    early_final: bool = True          # start the final transcription when silence begins, not when the hangover ends


@dataclass
class LlmConfig:
    engine: str = "embedded"          # embedded (CTranslate2) | openai (any compatible endpoint)
    model: str = "bundled:smollm2-135m-gguf"  # embedded: bundled:NAME | .gguf file | CT2 dir
    device: str = "auto"
    compute_type: str = "auto"        # auto = float16 on CUDA, float32 on CPU (int8 drifts on the 135M model)
    threads: int = 0
    max_tokens: int = 60
    temperature: float = 0.0
    system_prompt: str = (
        # Measured on the bundled SmolLM2-135M (12 questions): this wording kept it
        # in English; "voice assistant ... Always answer in English" drifted into French.
        "You are a helpful assistant. Answer the question briefly in plain English."
    )
    base_url: str = "http://127.0.0.1:8000/v1"   # openai engine
    remote_model: str = "default"                # openai engine: the model name to request
    api_key_env: str = "OPENAI_API_KEY"          # openai engine: env var that holds the key
    connect_timeout_s: float = 3.0
    first_token_timeout_s: float = 10.0
    history_turns: int = 8            # past exchanges kept in the prompt
    speculate: bool = True            # start the LLM (and TTS) on the early transcript, before the hangover ends


@dataclass
class TtsConfig:
    engine: str = "piper"             # piper (GPL-3.0) | espeak
    voice: str = "bundled:piper-joe"  # piper: bundled:NAME | .onnx path
    threads: int = 2                  # piper: ONNX threads per synthesis (the LLM pauses while the first piece is made)
    espeak_voice: str = "en-us"
    espeak_speed_wpm: int = 175
    min_clause_chars: int = 12        # a clause shorter than this waits for more text before TTS
    first_piece_max_words: int = 6    # first piece: cut after this many words if no punctuation came (0 = off)


@dataclass
class InterruptConfig:
    mode: str = "barge_in"            # barge_in | half_duplex (ignore the caller while the agent speaks)
    onset_ms: int = 60                # voiced audio that pauses the agent at once (reaction time)
    min_speech_ms: int = 300          # voiced caller speech that interrupts at once (shorter speech: its words decide)
    require_words: bool = False       # ... and only if the speech transcribes to at least one word
    resume_after_ms: int = 600        # a pause with no interruption this long after the voice stops resumes the agent
    echo_guard: bool = True           # ignore caller audio that is the agent's own voice coming back
    echo_correlation: float = 0.6     # normalised correlation with recently played audio above which it is echo


@dataclass
class WebRtcConfig:
    # STUN/TURN servers handed to aiortc and to the page; empty = host candidates only
    stun_urls: list[str] = field(default_factory=list)
    turn_urls: list[str] = field(default_factory=list)
    turn_username: str = ""
    turn_credential_env: str = "SUB300_TURN_CREDENTIAL"   # env var holding the TURN secret
    max_calls: int = 8


@dataclass
class SipConfig:
    enabled: bool = False
    host: str = "127.0.0.1"            # SIP listen address (UDP and TCP)
    port: int = 5060
    public_address: str = ""           # address written into SDP/Contact; default: host
    rtp_port_min: int = 20000
    rtp_port_max: int = 20999
    max_calls: int = 8                 # 503 beyond this
    allowed_sources: list[str] = field(default_factory=lambda: ["127.0.0.1/32"])  # CIDRs allowed to INVITE
    auth_username: str = ""            # digest auth for INVITE when set
    auth_password_env: str = "SUB300_SIP_PASSWORD"
    realm: str = "sub300"
    codecs: list[str] = field(default_factory=lambda: ["PCMU", "PCMA"])


@dataclass
class ModelsConfig:
    cache_dir: str = "~/.cache/sub300"   # converted models (GGUF → CTranslate2)
    allow_download: bool = False         # hub names load only from the local cache unless true


@dataclass
class Config:
    budget_ms: int = 300
    # the agent hangs up after answering a turn that contains one of these
    hangup_phrases: list[str] = field(default_factory=lambda: ["goodbye", "good bye", "bye", "hang up"])
    server: ServerConfig = field(default_factory=ServerConfig)
    vad: VadConfig = field(default_factory=VadConfig)
    stt: SttConfig = field(default_factory=SttConfig)
    llm: LlmConfig = field(default_factory=LlmConfig)
    tts: TtsConfig = field(default_factory=TtsConfig)
    interrupt: InterruptConfig = field(default_factory=InterruptConfig)
    webrtc: WebRtcConfig = field(default_factory=WebRtcConfig)
    sip: SipConfig = field(default_factory=SipConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)

    @property
    def cache_path(self) -> Path:
        return Path(os.path.expanduser(self.models.cache_dir))


CHOICES = {
    ("vad", "engine"): {"webrtc", "silero"},
    ("vad", "frame_ms"): {10, 20, 30},
    ("stt", "engine"): {"faster-whisper"},
    ("stt", "device"): {"auto", "cpu", "cuda"},
    ("stt", "padding"): {"short", "window", "full"},
    ("llm", "engine"): {"embedded", "openai"},
    ("llm", "device"): {"auto", "cpu", "cuda"},
    ("tts", "engine"): {"piper", "espeak"},
    ("interrupt", "mode"): {"barge_in", "half_duplex"},
}
LIST_CHOICES = {("sip", "codecs"): {"PCMU", "PCMA"}}
RANGES = {
    ("server", "port"): (0, 65535),
    ("vad", "aggressiveness"): (0, 3),
    ("vad", "threshold"): (0.0, 1.0),
    ("vad", "min_speech_ms"): (0, 5000),
    ("vad", "hangover_ms"): (20, 5000),
    ("vad", "pre_roll_ms"): (0, 2000),
    ("vad", "max_utterance_s"): (1, 600),
    ("stt", "beam_size"): (1, 16),
    ("stt", "window_s"): (1.0, 30.0),
    ("stt", "cpu_threads"): (0, 512),
    ("stt", "partial_interval_ms"): (0, 60_000),
    ("llm", "max_tokens"): (1, 8192),
    ("llm", "temperature"): (0.0, 2.0),
    ("llm", "threads"): (0, 512),
    ("llm", "history_turns"): (0, 1000),
    ("tts", "min_clause_chars"): (0, 1000),
    ("tts", "threads"): (1, 64),
    ("tts", "first_piece_max_words"): (0, 100),
    ("tts", "espeak_speed_wpm"): (80, 500),
    ("", "budget_ms"): (1, 60_000),
    ("webrtc", "max_calls"): (1, 10_000),
    ("interrupt", "onset_ms"): (10, 2000),
    ("interrupt", "min_speech_ms"): (0, 5000),
    ("interrupt", "resume_after_ms"): (50, 10_000),
    ("interrupt", "echo_correlation"): (0.0, 1.0),
    ("sip", "port"): (0, 65535),
    ("sip", "rtp_port_min"): (1024, 65535),
    ("sip", "rtp_port_max"): (1024, 65535),
    ("sip", "max_calls"): (1, 10_000),
}


def _sections(config: Config) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if dataclasses.is_dataclass(getattr(config, f.name))}


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """Turn a TOML or environment value into the field's type."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
            return value.lower() in {"1", "true", "yes", "on"}
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, str):  # from the environment: comma-separated
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ConfigError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r}")


def _apply(target: Any, values: Mapping[str, Any], where: str) -> None:
    hints = typing.get_type_hints(type(target))
    names = {f.name for f in dataclasses.fields(target)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(names))})")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}.{key}: expected a table")
            _apply(current, value, f"{where}.{key}" if where else key)
        else:
            setattr(target, key, _coerce(value, hints[key], f"{where}.{key}" if where else key))


def validate(config: Config) -> Config:
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(config, section), key)
        if value not in allowed:
            raise ConfigError(f"{section}.{key}: {value!r} is not one of {sorted(allowed)}")
    for (section, key), (low, high) in RANGES.items():
        owner = getattr(config, section) if section else config
        value = getattr(owner, key)
        if not low <= value <= high:
            name = f"{section}.{key}" if section else key
            raise ConfigError(f"{name}: {value} is outside [{low}, {high}]")
    for (section, key), allowed in LIST_CHOICES.items():
        bad = [v for v in getattr(getattr(config, section), key) if v not in allowed]
        if bad:
            raise ConfigError(f"{section}.{key}: {bad} not in {sorted(allowed)}")
    if config.sip.rtp_port_min > config.sip.rtp_port_max:
        raise ConfigError("sip.rtp_port_min must not exceed sip.rtp_port_max")
    if not config.sip.codecs:
        raise ConfigError("sip.codecs: at least one codec is needed")
    if config.vad.engine == "webrtc" and config.vad.frame_ms not in (10, 20, 30):
        raise ConfigError("vad.frame_ms must be 10, 20 or 30 for webrtcvad")
    return config


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``SUB300_STT_MODEL=x`` → ``{"stt": {"model": "x"}}``; ``SUB300_BUDGET_MS`` → top level."""
    sections = {f.name for f in dataclasses.fields(Config) if f.name in _sections(Config())}
    top_level = {f.name for f in dataclasses.fields(Config)} - sections
    out: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == "SUB300_CONFIG":
            continue
        rest = name[len(ENV_PREFIX):].lower()
        if rest in top_level:
            out[rest] = value
            continue
        section, _, key = rest.partition("_")
        if section not in sections or not key:
            raise ConfigError(f"environment variable {name}: no such setting")
        out.setdefault(section, {})[key] = value
    return out


def load_config(path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> Config:
    environ = os.environ if environ is None else environ
    config = Config()
    path = path or environ.get("SUB300_CONFIG")
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        _apply(config, data, "")
    _apply(config, env_overrides(environ), "")
    return validate(config)


def to_toml(config: Config) -> str:
    """The effective configuration, as a TOML file one could load back."""

    def fmt(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(value, list):
            return "[" + ", ".join(fmt(v) for v in value) + "]"
        return repr(value)

    lines = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not dataclasses.is_dataclass(value):
            lines.append(f"{f.name} = {fmt(value)}")
    for name, section in _sections(config).items():
        lines.append(f"\n[{name}]")
        for f in dataclasses.fields(section):
            lines.append(f"{f.name} = {fmt(getattr(section, f.name))}")
    return "\n".join(lines) + "\n"
