"""Engines as plugins (agent/plugins.py): one list of names, the installed entry points.

sub300's own engines come from its own distribution's entry points; a third-party distribution
registers an STT engine "echo-test-stt" the same way, is selected by name in the configuration
(with its own ``[stt.options]``) and answers a conversation.  The fast tests install it as
importlib.metadata finds any installed distribution (a ``.dist-info`` with ``entry_points.txt`` on
sys.path); the slow one ``pip install``s a real wheel of it and runs ``sub300 config`` on it.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from sub300.agent import plugins
from sub300.agent.config import ConfigError, load_config
from sub300.agent.engines import STT_ENGINES, load_engines
from sub300.agent.events import TurnFinished
from sub300.testing.fakes import FakeLlm, FakeTts, FakeVad, speech
from sub300.testing.scripted_caller import ScriptedCaller

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_MODULE = textwrap.dedent('''
    """A third-party STT engine: answers what its options say, whatever was spoken."""
    from sub300.models.protocols import Transcript


    class EchoStt:
        name = "echo-test-stt"
        device = "cpu/echo"

        def __init__(self, text):
            self.text = text

        def transcribe(self, audio):
            return Transcript(self.text, len(audio) / 16000, 0.0)


    def factory(config):
        return EchoStt(str(config.stt.options.get("text", "echo")))
''')


def install_dist_info(where: Path, entry_points: str, *, name: str = "echo-test-stt",
                      module: str | None = PLUGIN_MODULE) -> None:
    """An installed distribution as importlib.metadata sees one: its module and its .dist-info."""
    if module is not None:
        (where / "echo_test_stt.py").write_text(module)
    info = where / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A directory on sys.path for distributions installed by the test; the lookup is refreshed around it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.refresh()
    yield tmp_path
    monkeypatch.undo()
    plugins.refresh()
    sys.modules.pop("echo_test_stt", None)


def test_the_builtin_engines_are_the_sub300_distributions_entry_points():
    for stage, names in {"vad": {"webrtc", "silero"}, "stt": {"faster-whisper", "openai"},
                         "llm": {"embedded", "openai"}, "tts": {"piper", "espeak", "coqui", "openai"},
                         "turn": {"vad", "smart-turn"}}.items():
        assert names <= set(plugins.engine_names(stage))
        assert all(plugins.is_builtin(stage, name) for name in names)
    assert plugins.engine_names("vad", "webrtc")[0] == "webrtc"     # the default first, as `sub300 config` lists them
    assert set(STT_ENGINES) == set(plugins.engine_names("stt"))      # the registry is the entry points, not a 2nd list
    with pytest.raises(ConfigError, match=r"stt\.engine = 'echo-test-stt' .*not allowed: expected one of "
                                          r"'faster-whisper', 'openai' \(the installed STT engines"):
        load_config(environ={"SUB300_STT_ENGINE": "echo-test-stt"})
    with pytest.raises(ConfigError, match=r"stt\.options: the built-in engine 'faster-whisper' takes no options"):
        load_config(environ={"SUB300_STT_OPTIONS": '{"text": "hi"}'})


@pytest.mark.looptime
async def test_a_plugin_stt_selected_by_name_answers_a_conversation(site):
    install_dist_info(site, "[sub300.stt]\necho-test-stt = echo_test_stt:factory\n")
    config = load_config(environ={"SUB300_STT_ENGINE": "echo-test-stt",
                                  "SUB300_STT_OPTIONS": '{"text": "What is the weather?"}'})
    assert "echo-test-stt" in plugins.engine_names("stt") and not plugins.is_builtin("stt", "echo-test-stt")
    progress: list[str] = []
    engines = load_engines(config, progress=progress.append,
                           given={"vad": FakeVad(), "llm": FakeLlm(["Sunny all day."]), "tts": FakeTts()})
    assert engines.stt.name == "echo-test-stt" and engines.given == {"vad", "llm", "tts"}
    assert any(line.startswith("loaded STT: echo-test-stt") for line in progress)
    caller = ScriptedCaller(engines, config, clock=asyncio.get_running_loop().time)
    try:
        await caller.silence(0.5)
        await caller.say(speech(1.0))
        await caller.until_idle()
    finally:
        await caller.close()
    (turn,) = [e for e in caller.events if isinstance(e, TurnFinished)]
    assert (turn.transcript, turn.reply) == ("What is the weather?", "Sunny all day.")


def test_a_plugin_that_fails_to_import_names_its_package(site):
    install_dist_info(site, "[sub300.stt]\nbroken-stt = no_such_module_here:factory\n", name="broken-plugin",
                      module=None)
    config = load_config(environ={"SUB300_STT_ENGINE": "broken-stt"})   # the name is installed: valid
    with pytest.raises(plugins.PluginError, match=r"stt\.engine = 'broken-stt': the entry point "
                                                  r"'no_such_module_here:factory' of the package 'broken-plugin' "
                                                  r"failed to load: ModuleNotFoundError"):
        load_engines(config, progress=lambda line: None, given={"vad": FakeVad(), "llm": FakeLlm(), "tts": FakeTts()})


def build_wheel(where: Path) -> Path:
    """The plugin as a wheel (PEP 427), written by hand: this venv's setuptools (65) cannot build one offline."""
    files = {"echo_test_stt.py": PLUGIN_MODULE,
             "echo_test_stt-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: echo-test-stt\nVersion: 0.1\n",
             "echo_test_stt-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\n"
                                                  "Tag: py3-none-any\n",
             "echo_test_stt-0.1.dist-info/entry_points.txt": "[sub300.stt]\necho-test-stt = echo_test_stt:factory\n"}
    record = "".join(f"{name},,\n" for name in files) + "echo_test_stt-0.1.dist-info/RECORD,,\n"
    wheel = where / "echo_test_stt-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in {**files, "echo_test_stt-0.1.dist-info/RECORD": record}.items():
            archive.writestr(name, text)
    return wheel


@pytest.mark.slow
def test_a_pip_installed_plugin_is_a_choice_of_sub300_config(tmp_path):
    """A real distribution installed by pip (offline, into its own directory), then `sub300 config` on it."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--target", str(target), str(build_wheel(tmp_path))], check=True, timeout=300)
    assert list(target.glob("echo_test_stt-0.1.dist-info/entry_points.txt"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUB300_")}
    env.update(PYTHONPATH=str(target), SUB300_STT_ENGINE="echo-test-stt",
               SUB300_STT_OPTIONS='{"text": "hello"}')
    shown = subprocess.run([sys.executable, "-m", "sub300.cli", "config"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "# installed: faster-whisper, echo-test-stt, openai\nengine = \"echo-test-stt\"" in shown.stdout
    assert 'options = {"text" = "hello"}' in shown.stdout
    env.pop("PYTHONPATH")   # uninstalled: the name is refused, with the names there are
    refused = subprocess.run([sys.executable, "-m", "sub300.cli", "config"], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "expected one of 'faster-whisper', 'openai'" in refused.stderr


def test_an_uninstalled_checkout_says_sub300_must_be_installed(monkeypatch):
    """Run from a source tree that was never installed: no entry point, so no engine -- said in one line."""
    monkeypatch.setattr(plugins, "entry_points", lambda group: [])
    plugins.refresh()
    try:
        with pytest.raises(plugins.PluginError, match=r"no VAD engine is installed \(entry-point group sub300\.vad "
                                                      r"is empty\): sub300 itself must be installed"):
            load_engines(load_config(environ={}), progress=lambda line: None)
        with pytest.raises(ConfigError, match=r"stt\.engine = 'openai' .*no STT engine is installed"):
            load_config(environ={"SUB300_STT_ENGINE": "openai"})
    finally:
        monkeypatch.undo()
        plugins.refresh()
