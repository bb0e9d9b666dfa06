"""`sub300 converse` end to end: real engines, bundled models, real-time pacing.

A spoken question made at test time with espeak-ng goes in; the agent's
spoken answer comes out; transcribing that answer back gives the words of
the reply text — a round trip through VAD, STT, LLM and TTS.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from sub300.agent.audio import int16_to_float32
from sub300.media.audio_file import read_audio

from .speech import compose, save, speak, voiced_span

# The answer chain is ordered; the endpoint may fall anywhere after speech_end, since the
# transcription (and, speculatively, the LLM and TTS) may start inside the hangover.
CHAIN = ["speech_end", "stt_start", "stt_final", "llm_start", "llm_first_token",
         "first_piece", "tts_start", "tts_first_audio", "first_audio_out", "last_audio_out"]


def converse(*args: str, timeout: float = 180, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUB300_")} | (env_extra or {})
    return subprocess.run([sys.executable, "-m", "sub300.cli", "converse", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


@pytest.fixture(scope="module")
def one_question(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("converse")
    caller = compose(0.8, speak("What is the capital of France?"), 1.0)
    wav = save(tmp / "question.wav", caller)
    out = tmp / "answer.wav"
    result = converse(str(wav), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    turns = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return caller, out, turns, result


@pytest.mark.slow
def test_question_is_heard_and_answered(one_question):
    _, _, turns, _ = one_question
    assert len(turns) == 1
    turn = turns[0]
    assert {"capital", "france"} <= words(turn["transcript"]), turn["transcript"]
    assert turn["reply"].strip()


@pytest.mark.slow
def test_ledger_marks_are_ordered_and_stages_add_up(one_question):
    turn = one_question[2][0]
    marks = turn["marks"]
    assert set(CHAIN) | {"speech_start", "endpoint"} <= set(marks), set(CHAIN) - set(marks)
    assert marks["speech_start"] < marks["speech_end"] == 0.0 < marks["endpoint"] <= marks["first_audio_out"]
    seq = [marks[m] for m in CHAIN]
    assert seq == sorted(seq), marks
    # the audio goes out only once the turn is over
    assert marks["endpoint"] <= marks["first_audio_out"]
    assert sum(turn["stages_ms"].values()) == pytest.approx(turn["voice_to_voice_ms"], abs=0.5)
    assert turn["voice_to_voice_ms"] == pytest.approx(marks["first_audio_out"], abs=0.2)
    assert turn["voice_to_voice_ms"] > 0


@pytest.mark.slow
def test_answer_audio_is_speech_and_says_the_reply(one_question, engines):
    caller, out, turns, _ = one_question
    agent = read_audio(out)  # OUT.wav is resampled back to 16 kHz for the checks
    span = voiced_span(agent)
    assert span is not None, "the agent's audio is silent"
    transcript = engines.stt.transcribe(int16_to_float32(agent[int(span[0] * 16000):])).text
    reply_words, heard = words(turns[0]["reply"]), words(transcript)
    common = reply_words & heard
    assert len(common) >= max(2, len(reply_words) // 2), (turns[0]["reply"], transcript)


@pytest.mark.slow
def test_out_wav_is_on_the_callers_timeline(one_question):
    """The agent's first sound sits where the ledger says: speech_end + voice_to_voice."""
    caller, out, turns, _ = one_question
    agent = read_audio(out)
    caller_end = voiced_span(caller)[1]
    agent_start = voiced_span(agent)[0]
    measured_ms = (agent_start - caller_end) * 1000
    # 20 ms frames on both sides + the refinement of the end of speech + Piper's soft onset
    assert measured_ms == pytest.approx(turns[0]["voice_to_voice_ms"], abs=80), measured_ms


@pytest.mark.slow
def test_two_questions_give_two_turns_with_history(tmp_path):
    caller = compose(0.5, speak("What is the capital of France?"), 2.5,
                     speak("How many days are in a week?"), 1.0)
    result = converse(str(save(tmp_path / "two.wav", caller)), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    turns = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [t["turn"] for t in turns] == [1, 2]
    assert "france" in words(turns[0]["transcript"])
    assert {"days", "week"} <= words(turns[1]["transcript"])


@pytest.mark.slow
def test_silence_only_gives_no_turn(tmp_path):
    rng = np.random.default_rng(1)
    quiet = compose(2.0, rng.normal(0, 20, 16000).astype(np.int16), 1.0)
    result = converse(str(save(tmp_path / "quiet.wav", quiet)), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == ""
    assert "no turn was answered" in result.stderr


@pytest.mark.slow   # the real `sub300` process, ~0.6 s each
@pytest.mark.parametrize("name, content, message", [
    ("missing.wav", None, "no such file"),
    ("empty.wav", b"", "empty file"),
    ("noise.wav", b"this is not audio at all" * 20, "cannot decode"),
])
def test_bad_input_is_a_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    result = converse(str(path), timeout=60)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unreadable_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = save(tmp_path / "locked.wav", compose(1.0))
    path.chmod(0)
    result = converse(str(path), timeout=60)
    assert result.returncode == 2 and "not readable" in result.stderr


@contextlib.contextmanager
def failing_llm_endpoint() -> Iterator[str]:
    """The fake misbehaving OpenAI-compatible server of test_llm_failures.py, on 127.0.0.1 in a
    thread of its own (the CLI runs as a subprocess); yields its base URL (scenarios are paths)."""
    from aiohttp import web

    from .test_llm_failures import fake_endpoint

    loop = asyncio.new_event_loop()
    runner = web.AppRunner(fake_endpoint(), shutdown_timeout=1.0)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    host, port = runner.addresses[0][:2]
    thread = threading.Thread(target=loop.run_forever, name="fake-llm-endpoint", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


FALLBACK = "Sorry, I can't answer that right now."


@pytest.mark.slow
@pytest.mark.parametrize("scenario, kind", [("drop", "dropped"), ("only_finish", "empty"), ("http_500", "http_5xx")])
def test_llm_endpoint_failures_are_reported_and_the_fallback_is_spoken(tmp_path, engines, scenario, kind):
    """Two questions to an LLM endpoint that fails every time: one log line per failed turn, no
    traceback, exit 1, and the caller hears the fallback line (transcribed back from OUT.wav)."""
    caller = compose(0.5, speak("What is the capital of France?"), 5.0, speak("How many days are in a week?"), 5.0)
    wav, out = save(tmp_path / "two.wav", caller), tmp_path / "out.wav"
    with failing_llm_endpoint() as url:
        result = converse(str(wav), "--out", str(out), "--json", env_extra={
            "SUB300_LLM_ENGINE": "openai", "SUB300_LLM_BASE_URL": f"{url}/{scenario}",
            "SUB300_LLM_FALLBACK_TEXT": FALLBACK,
            # one first piece, "Let me think about that.": with the 3-word cut the reply pauses its reading
            # while "Let me think" is synthesized, and aiohttp loses its buffered rest when the body breaks
            "SUB300_TTS_FIRST_PIECE_MAX_WORDS": "6"})
    assert result.returncode == 1, result.stderr[-3000:]
    stderr = result.stderr
    assert "Traceback" not in stderr and "ExceptionGroup" not in stderr and "no speech detected" not in stderr
    failures = re.findall(r"turn (\d+) failed: LLM (.*)", stderr)
    assert [n for n, _ in failures] == ["1", "2"], stderr[-3000:]
    assert all(f"{url}/{scenario}/chat/completions" in line for _, line in failures), failures
    assert "2 of 2 turns failed" in stderr
    turns = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(t["turn"], t["failed"]["stage"], t["failed"]["kind"]) for t in turns] == [(1, "llm", kind), (2, "llm", kind)]
    assert all(t["reply"].endswith(FALLBACK) and "failed" in t["notes"] and not t["notes"]["interrupted"]
               for t in turns), turns
    if scenario == "drop":   # the complete sentence streamed before the drop is spoken first
        assert all(t["reply"] == f"Let me think about that. {FALLBACK}" for t in turns)
    # the caller hears the fallback after each question
    agent = read_audio(out)
    heard = words(engines.stt.transcribe(int16_to_float32(agent)).text)
    assert {"sorry", "answer", "right", "now"} <= heard, heard
