"""Quiet callers keep the end of their words (issue 9), and `speech_end` stays honest.

Fast tier: the `Endpointer` on synthetic speech with a known end — a loud
part, then a soft final fricative 30 dB under it, then silence (or a noise
floor) — with a fake VAD that, like webrtcvad, calls the fricative unvoiced
and keeps calling frames voiced ~100 ms after the voice, at several levels;
and a conversation (fake engines, virtual time) whose final transcription
gets `stt.tail_ms` of audio after the refined end.  Slow tier: Piper's
"What is the capital of France?" at x0.05 through webrtcvad and real Whisper,
in a call: the transcript has "France".
"""
from __future__ import annotations

import asyncio
import copy

import numpy as np
import pytest

from sub300.agent.endpointing import Endpointer, SpeechEnded
from sub300.models.protocols import SAMPLE_RATE
from sub300.testing.fakes import FRAME, FakeStt, FakeVad, fake_engines, speech

RATE = SAMPLE_RATE


def utterance(gain: float, *, noise_dbfs: float | None = None, seed: int = 0):
    """(pcm int16, true end sample, voiced flags per 20 ms frame): 0.4 s lead, 1.0 s of "speech" at
    `gain`, a 120 ms fricative (high-passed noise) 30 dB under it, 0.8 s of silence — or of noise
    at ``noise_dbfs`` rms throughout.  The fake VAD calls the speech voiced, the fricative
    unvoiced, and 100 ms after it voiced again (a detector's own hangover), as webrtcvad does."""
    rng = np.random.default_rng(seed)
    lead, body = np.zeros(int(0.4 * RATE)), speech(1.0, level=8000, seed=seed).astype(np.float64)
    hiss = np.diff(rng.normal(0, 1, int(0.12 * RATE) + 1))
    hiss *= np.sqrt(np.mean(body ** 2)) * 10 ** (-30 / 20) / np.sqrt(np.mean(hiss ** 2))
    tail = np.zeros(int(0.8 * RATE))
    x = np.concatenate([lead, body, hiss, tail]) * gain
    true_end = len(lead) + len(body) + len(hiss)
    if noise_dbfs is not None:
        x += rng.normal(0, 32768 * 10 ** (noise_dbfs / 20), len(x))
    pcm = np.clip(x, -32768, 32767).astype(np.int16)
    frames = len(pcm) // FRAME
    body_frames = range(len(lead) // FRAME, (len(lead) + len(body)) // FRAME)
    hang = range(body_frames.stop, body_frames.stop + 5)      # 100 ms "voiced" after the loud part
    voiced = [k in body_frames or k in hang for k in range(frames)]
    return pcm, true_end, voiced


def ends(pcm: np.ndarray, voiced: list[bool], *, relative: bool = True) -> list[SpeechEnded]:
    ep = Endpointer(FakeVad(voiced), min_speech_ms=100, hangover_ms=250, relative=relative)
    out = []
    for i in range(0, len(pcm) - FRAME + 1, FRAME):
        out += [e for e in ep.feed(pcm[i:i + FRAME], (i + FRAME) / RATE) if isinstance(e, SpeechEnded)]
    return out


@pytest.mark.parametrize("gain", [1.0, 0.1, 0.05, 0.02])
@pytest.mark.parametrize("noise_dbfs", [None, -90.0])
def test_the_soft_end_is_kept_and_speech_end_is_not_late(gain, noise_dbfs):
    pcm, true_end, voiced = utterance(gain, noise_dbfs=noise_dbfs)
    (ended,) = ends(pcm, voiced)
    assert ended.end_sample <= true_end, "speech_end later than the end of the voice"
    assert ended.speech_end <= true_end / RATE
    assert ended.end_sample >= true_end - 160, "the soft last sound was cut off"   # within one 10 ms block


@pytest.mark.parametrize("gain", [0.05, 0.02])
def test_the_old_fixed_floor_cuts_a_quiet_callers_end(gain):
    """What issue 9 fixed: with the fixed -55 dBFS floor the fricative of a quiet caller is lost."""
    pcm, true_end, voiced = utterance(gain)
    (ended,) = ends(pcm, voiced, relative=False)
    assert ended.end_sample < true_end - 0.08 * RATE


@pytest.mark.parametrize("gain", [1.0, 0.05])
def test_a_noise_floor_is_not_speech(gain):
    """On a noisy line the end stops where the voice stops, not where the noise does (it never does)."""
    loud_noise = 20 * np.log10(gain) - 45.0          # 45 dB under a caller's level: above the fricative
    pcm, true_end, voiced = utterance(gain, noise_dbfs=loud_noise)
    (ended,) = ends(pcm, voiced)
    assert ended.end_sample <= true_end
    assert ended.end_sample >= true_end - 0.12 * RATE - 160   # at worst the fricative drowned in noise


def test_the_noise_floor_is_tracked_per_call():
    ep = Endpointer(FakeVad(), min_speech_ms=100, hangover_ms=250)
    assert ep.noise_floor_db == -120.0
    rng = np.random.default_rng(1)
    quiet = rng.normal(0, 32768 * 10 ** (-60 / 20), RATE).astype(np.int16)
    ep_fake = Endpointer(FakeVad([False] * 50), min_speech_ms=100, hangover_ms=250)
    ep_fake.feed(quiet, 1.0)
    assert -64.0 < ep_fake.noise_floor_db < -58.0


# ------------------------------------------------------------------ the STT cut in a call
looptime = pytest.importorskip("looptime", reason="virtual time needs the test extra (looptime)")


@pytest.mark.looptime
@pytest.mark.parametrize("tail_ms", [0, 100, 200])
async def test_the_final_transcription_gets_the_tail(config, tail_ms):
    from sub300.testing.scripted_caller import ScriptedCaller

    c = copy.deepcopy(config)
    c.stt.tail_ms, c.stt.partial_interval_ms = tail_ms, 0
    stt = FakeStt("What is the capital of France?", delay_s=0.05)
    caller = ScriptedCaller(fake_engines(stt=stt), c, clock=asyncio.get_running_loop().time)
    try:
        await caller.silence(0.5)
        await caller.say(speech(1.0))
        await caller.until_idle()
    finally:
        await caller.close()
    # the turn's audio starts at 0.5 s - 200 ms pre-roll; the voice ends at 1.5 s
    covered = max(seconds for _start, seconds in stt.calls)
    assert covered >= 1.5 - 0.3 + tail_ms / 1000 - 1e-6
    assert covered <= 1.5 - 0.3 + max(tail_ms / 1000, 0.02) + 0.02 + 1e-6


# ------------------------------------------------------------------ real Whisper
@pytest.mark.slow
def test_a_quiet_caller_is_heard_to_the_end(config):
    from sub300.agent.engines import Engines, _webrtc_vad, _whisper
    from sub300.testing.fakes import FakeLlm, FakeTts
    from sub300.testing.scripted_caller import ScriptedCaller
    from tests.speech import speak

    question = speak("What is the capital of France?")
    quiet = (question.astype(np.float64) * 0.05).astype(np.int16)
    assert 20 * np.log10(np.abs(quiet).max() / 32768) < -25          # the field case's level
    c = copy.deepcopy(config)

    async def call() -> list[str]:
        # the configured VAD and Whisper, as a call loads them; a fake LLM and TTS (not under test)
        eng = Engines(vad=_webrtc_vad(c), stt=_whisper(c), llm=FakeLlm(["Paris."]), tts=FakeTts())
        caller = ScriptedCaller(eng, c)
        try:
            await caller.silence(0.5)
            await caller.say(quiet)
            await caller.until_idle(timeout=30)
        finally:
            await caller.close()
        from sub300.agent.events import TurnFinished

        return [e.transcript for e in caller.events if isinstance(e, TurnFinished)]

    transcripts = asyncio.run(call())
    assert len(transcripts) == 1 and "france" in transcripts[0].lower(), transcripts


# ------------------------------------------------------------------ the detector hears a quiet caller
def _espeak(text: str) -> np.ndarray:
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    from sub300.media.audio_file import read_audio

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "s.wav"
        subprocess.run(["espeak-ng", "-s", "160", "-w", str(wav), text], check=True, capture_output=True)
        return read_audio(wav, RATE)


def _turns(pcm: np.ndarray, *, relative: bool) -> list[SpeechEnded]:
    from sub300.models.vad_webrtc import WebRtcVad

    ep = Endpointer(WebRtcVad(), min_speech_ms=100, hangover_ms=250, relative=relative)
    out = []
    for i in range(0, len(pcm) - FRAME + 1, FRAME):
        out += [e for e in ep.feed(pcm[i:i + FRAME], (i + FRAME) / RATE) if isinstance(e, SpeechEnded)]
    return out


@pytest.mark.parametrize("gain", [0.02, 0.01])
def test_a_very_quiet_caller_opens_a_turn(gain):
    """webrtcvad's own energy gate misses a caller at x0.01 (peak ~-45 dBFS); the endpointer lifts
    the detector's copy of the line to the caller's level, so the turn opens and ends where the voice does."""
    spoken = _espeak("What is the capital of France?")
    quiet = (spoken.astype(np.float64) * gain).astype(np.int16)
    voiced = np.flatnonzero(np.abs(quiet) > 0)
    pcm = np.concatenate([np.zeros(RATE // 2, np.int16), quiet, np.zeros(RATE, np.int16)])
    true_end = RATE // 2 + voiced[-1] + 1
    turns = _turns(pcm, relative=True)
    assert turns, "no turn for a quiet caller"
    assert turns[-1].end_sample <= true_end
    assert turns[-1].end_sample >= true_end - 0.15 * RATE
    if gain == 0.01:
        assert not _turns(pcm, relative=False), "the old endpointing heard it too: this level proves nothing"


@pytest.mark.parametrize("noise_dbfs", [-80.0, -65.0, -50.0])
def test_the_lift_does_not_make_a_noisy_line_speak(noise_dbfs):
    rng = np.random.default_rng(2)
    pcm = np.clip(rng.normal(0, 32768 * 10 ** (noise_dbfs / 20), 6 * RATE), -32768, 32767).astype(np.int16)
    assert not _turns(pcm, relative=True)
