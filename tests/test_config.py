"""Configuration: sources and precedence, the engines' constraints, one-line errors (no model is loaded)."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import get_args

import pytest
from pydantic import BaseModel

from sub300.agent.config import Config, ConfigError, SttConfig, VadConfig, load_config, override, to_toml
from sub300.models import defaults

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_valid_and_offline():
    config = load_config(environ={})
    assert config == Config()
    assert config.stt.model.startswith("bundled:")
    assert config.llm.engine == "embedded" and config.llm.model.startswith("bundled:")
    assert config.models.allow_download is False


def test_file_overrides_defaults(tmp_path):
    path = tmp_path / "sub300.toml"
    path.write_text('budget_ms = 250\n[vad]\nengine = "silero"\nthreshold = 0.7\n[sip]\ncodecs = ["PCMA"]\n')
    config = load_config(path, environ={})
    assert (config.budget_ms, config.vad.engine, config.vad.threshold, config.sip.codecs) == (250, "silero", 0.7, ["PCMA"])
    assert config.vad.hangover_ms == VadConfig().hangover_ms     # untouched keys keep their defaults


def test_environment_beats_the_file(tmp_path):
    path = tmp_path / "sub300.toml"
    path.write_text('budget_ms = 250\n[vad]\nhangover_ms = 300\n[stt]\nmodel = "/models/whisper"\n')
    config = load_config(path, environ={"SUB300_VAD_HANGOVER_MS": "200", "SUB300_MODELS_ALLOW_DOWNLOAD": "yes",
                                        "SUB300_LLM_ENGINE": "openai", "SUB300_BUDGET_MS": "280"})
    assert config.budget_ms == 280
    assert config.vad.hangover_ms == 200          # environment wins over the file
    assert config.stt.model == "/models/whisper"  # the file wins over the default
    assert config.llm.engine == "openai"
    assert config.models.allow_download is True


def test_config_file_from_the_environment(tmp_path):
    path = tmp_path / "sub300.toml"
    path.write_text("[vad]\nframe_ms = 30\n")
    assert load_config(environ={"SUB300_CONFIG": str(path)}).vad.frame_ms == 30


def test_environment_lists_are_comma_separated():
    config = load_config(environ={"SUB300_SIP_CODECS": "PCMA, PCMU", "SUB300_HANGUP_PHRASES": "bye,see you",
                                  "SUB300_WEBRTC_STUN_URLS": "", "SUB300_VAD_FRAME_MS": "10"})
    assert config.sip.codecs == ["PCMA", "PCMU"]
    assert config.hangup_phrases == ["bye", "see you"]
    assert config.webrtc.stun_urls == []
    assert config.vad.frame_ms == 10


def test_secrets_and_cli_variables_are_not_settings(tmp_path):
    environ = {"SUB300_SIP_PASSWORD": "x", "SUB300_TURN_CREDENTIAL": "y", "SUB300_LOG_LEVEL": "debug",
               "SUB300_SIP_AUTH_PASSWORD_ENV": "SUB300_GATEWAY_SECRET", "SUB300_GATEWAY_SECRET": "z"}
    assert load_config(environ=environ).sip.auth_password_env == "SUB300_GATEWAY_SECRET"
    path = tmp_path / "sub300.toml"
    path.write_text('[llm]\napi_key_env = "SUB300_LLM_KEY"\n')
    assert load_config(path, environ={"SUB300_LLM_KEY": "k"}).llm.api_key_env == "SUB300_LLM_KEY"


def test_round_trip_through_toml(tmp_path):
    config = load_config(environ={"SUB300_LLM_SYSTEM_PROMPT": 'Say "hi" \\ bye', "SUB300_SIP_CODECS": "PCMA"})
    path = tmp_path / "again.toml"
    path.write_text(to_toml(config))
    assert load_config(path, environ={}) == config
    assert tomllib.loads(to_toml(config))["llm"]["system_prompt"] == 'Say "hi" \\ bye'


def test_every_field_is_described_and_units_are_shown():
    sections = {name: type(value) for name, value in Config() if isinstance(value, BaseModel)}
    for model in [Config, *sections.values()]:
        assert model.__doc__ and model.__doc__.strip()
        for name, field in model.model_fields.items():
            assert field.description or name in sections, f"{model.__name__}.{name} has no description"
    text = to_toml(Config())
    assert "# silence after the last voiced frame that ends a turn (ms)\nhangover_ms = 250" in text
    assert "# a longer monologue is cut into turns of at most this length (s)" in text


def _defaults_of(function) -> dict:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_engine_defaults_are_the_config_defaults():
    from sub300.models.llm_ct2 import CTranslate2ChatModel
    from sub300.models.llm_openai import OpenAIChatModel
    from sub300.models.stt_whisper import PADDINGS, WhisperRecognizer
    from sub300.models.tts_espeak import EspeakSynthesizer
    from sub300.models.tts_piper import PiperSynthesizer
    from sub300.models.vad_silero import SileroVad
    from sub300.models.vad_webrtc import WebRtcVad

    c = Config()
    pairs = [
        (WebRtcVad, {"aggressiveness": c.vad.aggressiveness, "frame_ms": c.vad.frame_ms}),
        (SileroVad, {"threshold": c.vad.threshold}),
        (WhisperRecognizer, {"device": c.stt.device, "compute_type": c.stt.compute_type, "cpu_threads": c.stt.cpu_threads,
                             "beam_size": c.stt.beam_size, "language": c.stt.language, "padding": c.stt.padding,
                             "window_s": c.stt.window_s, "allow_download": c.models.allow_download}),
        (CTranslate2ChatModel, {"device": c.llm.device, "compute_type": c.llm.compute_type, "threads": c.llm.threads}),
        (OpenAIChatModel, {"connect_timeout_s": c.llm.connect_timeout_s,
                           "first_token_timeout_s": c.llm.first_token_timeout_s}),
        (PiperSynthesizer, {"voice": c.tts.voice, "threads": c.tts.threads}),
        (EspeakSynthesizer, {"voice": c.tts.espeak_voice, "speed_wpm": c.tts.espeak_speed_wpm}),
    ]
    for engine, expected in pairs:
        actual = _defaults_of(engine.__init__)
        assert {k: actual[k] for k in expected} == expected, engine.__name__
    # the choices the config offers are the ones the engines take
    assert get_args(VadConfig.model_fields["frame_ms"].annotation) == defaults.WEBRTC_FRAME_MS_CHOICES
    assert get_args(SttConfig.model_fields["padding"].annotation) == PADDINGS == defaults.WHISPER_PADDINGS


@pytest.mark.parametrize("environ, message", [
    ({"SUB300_VAD_ENGINE": "magic"}, r"vad\.engine = 'magic' .*one of 'webrtc', 'silero'"),
    ({"SUB300_VAD_HANGOVER_MS": "soon"}, r"vad\.hangover_ms = 'soon' .*an integer, 20 <= x <= 5000"),
    ({"SUB300_VAD_HANGOVER_MS": "0"}, "vad.hangover_ms"),
    ({"SUB300_VAD_AGGRESSIVENESS": "4"}, r"vad\.aggressiveness = '4' .*0 <= x <= 3"),
    ({"SUB300_VAD_AGGRESSIVENESS": "-1"}, "vad.aggressiveness"),
    ({"SUB300_VAD_THRESHOLD": "1.0"}, r"vad\.threshold = '1.0' \(from \$SUB300_VAD_THRESHOLD\) .*0 < x < 1"),
    ({"SUB300_VAD_THRESHOLD": "0"}, "vad.threshold"),
    ({"SUB300_VAD_FRAME_MS": "25"}, r"vad\.frame_ms = 25 .*one of 10, 20, 30"),
    ({"SUB300_VAD_MAX_UTTERANCE_S": "0"}, "vad.max_utterance_s"),
    ({"SUB300_STT_ENGINE": "vosk"}, "stt.engine"),
    ({"SUB300_STT_DEVICE": "gpu"}, r"stt\.device = 'gpu' .*'auto', 'cpu', 'cuda'"),
    ({"SUB300_STT_COMPUTE_TYPE": "int4"}, "stt.compute_type"),
    ({"SUB300_STT_PADDING": "medium"}, r"stt\.padding .*'short', 'window', 'full'"),
    ({"SUB300_STT_WINDOW_S": "31"}, r"stt\.window_s .*0 < x <= 30"),
    ({"SUB300_STT_WINDOW_S": "0"}, "stt.window_s"),
    ({"SUB300_STT_BEAM_SIZE": "0"}, "stt.beam_size"),
    ({"SUB300_STT_CPU_THREADS": "-2"}, "stt.cpu_threads"),
    ({"SUB300_STT_LANGUAGE": "English"}, "stt.language"),
    ({"SUB300_STT_EARLY_FINAL": "maybe"}, r"stt\.early_final .*true or false"),
    ({"SUB300_LLM_ENGINE": "llama"}, "llm.engine"),
    ({"SUB300_LLM_DEVICE": "tpu"}, "llm.device"),
    ({"SUB300_LLM_MAX_TOKENS": "0"}, "llm.max_tokens"),
    ({"SUB300_LLM_TEMPERATURE": "-0.1"}, "llm.temperature"),
    ({"SUB300_LLM_BASE_URL": "localhost:8000"}, r"llm\.base_url .*http:// or https://"),
    ({"SUB300_LLM_CONNECT_TIMEOUT_S": "0"}, "llm.connect_timeout_s"),
    ({"SUB300_LLM_FIRST_TOKEN_TIMEOUT_S": "-1"}, "llm.first_token_timeout_s"),
    ({"SUB300_TTS_ENGINE": "festival"}, "tts.engine"),
    ({"SUB300_TTS_THREADS": "0"}, "tts.threads"),
    ({"SUB300_TTS_ESPEAK_SPEED_WPM": "600"}, r"tts\.espeak_speed_wpm .*80 <= x <= 500"),
    ({"SUB300_INTERRUPT_MODE": "full_duplex"}, "interrupt.mode"),
    ({"SUB300_INTERRUPT_ECHO_CORRELATION": "1.5"}, "interrupt.echo_correlation"),
    ({"SUB300_SERVER_PORT": "0"}, r"server\.port = '0' .*1 <= x <= 65535"),
    ({"SUB300_SERVER_PORT": "65536"}, "server.port"),
    ({"SUB300_SIP_PORT": "99999"}, "sip.port"),
    ({"SUB300_SIP_CODECS": "PCMU,G729"}, r"sip\.codecs = .*G729: not a codec .*PCMU, PCMA"),
    ({"SUB300_SIP_CODECS": ""}, r"sip\.codecs = \[\] .*non-empty"),
    ({"SUB300_SIP_ALLOWED_SOURCES": "10.0.0.0/8,banana"}, r"sip\.allowed_sources .*'banana' is not an IP network"),
    ({"SUB300_SIP_RTP_PORT_MIN": "30001", "SUB300_SIP_RTP_PORT_MAX": "30001"}, r"sip\.rtp_port_min\.\.rtp_port_max"),
    ({"SUB300_SIP_RTP_PORT_MIN": "30000", "SUB300_SIP_RTP_PORT_MAX": "20000"}, r"sip\.rtp_port_min\.\.rtp_port_max"),
    ({"SUB300_WEBRTC_STUN_URLS": "stun.example.org"}, "webrtc.stun_urls"),
    ({"SUB300_WEBRTC_MAX_CALLS": "0"}, "webrtc.max_calls"),
    ({"SUB300_BUDGET_MS": "0"}, "budget_ms"),
    ({"SUB300_STT_WHATEVER": "1"}, r"stt\.whatever \(from \$SUB300_STT_WHATEVER\): unknown key"),
    ({"SUB300_NOPE_X": "1"}, "SUB300_NOPE_X: no such setting"),
    ({"SUB300_VAD": "1"}, "SUB300_VAD: no such setting"),
])
def test_bad_values_are_named(environ, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(environ=environ)
    assert "\n" not in str(caught.value)


def test_every_problem_on_one_line():
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"SUB300_VAD_THRESHOLD": "2", "SUB300_TTS_THREADS": "0"})
    text = str(caught.value)
    assert "vad.threshold" in text and "tts.threads" in text and "\n" not in text


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[vad\n")
    with pytest.raises(ConfigError, match="broken.toml"):
        load_config(broken, environ={})
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("vad = 3\n")
    with pytest.raises(ConfigError, match="expected a table"):
        load_config(wrong, environ={})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[vad]\nhangover = 300\n")
    with pytest.raises(ConfigError, match=r"vad\.hangover \(from .*unknown.toml\): unknown key .*hangover_ms"):
        load_config(unknown, environ={})
    unknown.write_text("[vda]\nhangover_ms = 300\n")
    with pytest.raises(ConfigError, match="vda.*unknown key"):
        load_config(unknown, environ={})
    typed = tmp_path / "typed.toml"
    typed.write_text("[vad]\nthreshold = 1\n")
    with pytest.raises(ConfigError, match=r"vad\.threshold = 1 \(from .*typed.toml\)"):
        load_config(typed, environ={})


def test_override_checks_and_copies():
    base = load_config(environ={})
    changed = override(base, {"vad": {"hangover_ms": "400"}, "server": {"port": 9000}})
    assert (changed.vad.hangover_ms, changed.server.port, base.vad.hangover_ms) == (400, 9000, 250)
    with pytest.raises(ConfigError, match=r"server\.port = 70000 \(from the command line\)"):
        override(base, {"server": {"port": 70000}}, origin="the command line")


def test_assignment_is_for_programs():
    config = load_config(environ={})
    config.server.host = "0.0.0.0"
    config.sip.port = 0       # tests: any free port
    assert (config.server.host, config.sip.port) == ("0.0.0.0", 0)


def _cli(*args: str, **environ: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUB300_")}
    return subprocess.run([sys.executable, "-m", "sub300.cli", *args], cwd=ROOT, env={**env, **environ},
                          capture_output=True, text=True, timeout=120)


# the CLI tests start the real `sub300` process (0.5-1 s each): slow tier, to keep the fast tier in seconds
@pytest.mark.slow
@pytest.mark.parametrize("command", [["config"], ["serve"], ["converse", "missing.wav"], ["prepare-models"]])
def test_cli_bad_value_is_one_line_and_exit_2(command):
    result = _cli(*command, SUB300_VAD_THRESHOLD="1.0")
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "vad.threshold = '1.0'" in result.stderr and "0 < x < 1" in result.stderr


@pytest.mark.slow
def test_cli_bad_port_and_log_level_exit_2():
    result = _cli("serve", "--port", "70000")
    assert (result.returncode, result.stderr.count("\n")) == (2, 1) and "server.port = 70000" in result.stderr
    result = _cli("config", SUB300_LOG_LEVEL="loud")
    assert (result.returncode, result.stderr.count("\n")) == (2, 1) and "'loud'" in result.stderr


@pytest.mark.slow
def test_cli_config_prints_loadable_toml_with_units(tmp_path):
    result = _cli("config", SUB300_VAD_HANGOVER_MS="300")
    assert result.returncode == 0, result.stderr
    assert "hangover_ms = 300" in result.stdout and "(ms)" in result.stdout
    path = tmp_path / "printed.toml"
    path.write_text(result.stdout)
    assert load_config(path, environ={}).vad.hangover_ms == 300
