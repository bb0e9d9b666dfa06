from __future__ import annotations

import tomllib

import pytest

from sub300.agent.config import ConfigError, load_config, to_toml


def test_defaults_are_valid_and_offline():
    config = load_config(environ={})
    assert config.stt.model.startswith("bundled:")
    assert config.llm.engine == "embedded" and config.llm.model.startswith("bundled:")
    assert config.models.allow_download is False


def test_file_then_environment(tmp_path):
    path = tmp_path / "sub300.toml"
    path.write_text('budget_ms = 250\n[vad]\nhangover_ms = 300\n[stt]\nmodel = "/models/whisper"\n')
    config = load_config(path, environ={"SUB300_VAD_HANGOVER_MS": "200", "SUB300_MODELS_ALLOW_DOWNLOAD": "yes"})
    assert config.budget_ms == 250
    assert config.vad.hangover_ms == 200          # environment wins over the file
    assert config.stt.model == "/models/whisper"
    assert config.models.allow_download is True


def test_round_trip_through_toml(tmp_path):
    config = load_config(environ={"SUB300_LLM_SYSTEM_PROMPT": 'Say "hi" \\ bye'})
    path = tmp_path / "again.toml"
    path.write_text(to_toml(config))
    assert load_config(path, environ={}) == config
    assert tomllib.loads(to_toml(config))["llm"]["system_prompt"] == 'Say "hi" \\ bye'


@pytest.mark.parametrize("environ, message", [
    ({"SUB300_VAD_ENGINE": "magic"}, "vad.engine"),
    ({"SUB300_VAD_HANGOVER_MS": "soon"}, "vad.hangover_ms"),
    ({"SUB300_VAD_AGGRESSIVENESS": "9"}, "vad.aggressiveness"),
    ({"SUB300_STT_WHATEVER": "1"}, "unknown key"),
    ({"SUB300_NOPE_X": "1"}, "SUB300_NOPE_X"),
])
def test_bad_values_are_named(environ, message):
    with pytest.raises(ConfigError, match=message):
        load_config(environ=environ)


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
