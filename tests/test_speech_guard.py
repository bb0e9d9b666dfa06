"""The non-speech guard (agent/speech_guard.py): tones, DTMF heard as audio, ringback,
noise and music are no turn; speech is never rejected.

Fast tier: the spectral measures on synthetic signals (numpy) and on spoken
audio from espeak-ng (a formant synthesiser: a subprocess, no model), and a
whole conversation on fake engines and virtual time that hears the field
case's tone (regenerated here: 0.5 s silence, 1 kHz sine 1 s, 3 s silence)
through the real webrtcvad.  Slow tier: the same calls with real Whisper, and
Piper's voice through the guard.
"""
from __future__ import annotations

import asyncio
import copy
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from sub300.agent import speech_guard
from sub300.agent.events import TurnDiscarded, TurnFinished
from sub300.models.protocols import SAMPLE_RATE
from sub300.testing.fakes import FakeStt, fake_engines
from sub300.testing.scripted_caller import ScriptedCaller

RATE = SAMPLE_RATE
DTMF = {"1": (697, 1209), "5": (770, 1336), "9": (852, 1477), "#": (941, 1477), "D": (941, 1633)}


def _t(seconds: float) -> np.ndarray:
    return np.arange(int(seconds * RATE)) / RATE


def tones(freqs, seconds: float, level: float = 0.3) -> np.ndarray:
    """Equal-level sines, float32 (sum peaks at ``level``)."""
    return (sum(np.sin(2 * np.pi * f * _t(seconds)) for f in freqs) * level / len(freqs)).astype(np.float32)


def noise(colour: str, seconds: float, level: float = 0.1, seed: int = 0) -> np.ndarray:
    """White, pink (1/f power) or brown (1/f² power) noise, float32 peaking at ``level``."""
    white = np.random.default_rng(seed).standard_normal(int(seconds * RATE))
    if colour == "white":
        x = white
    else:
        spectrum = np.fft.rfft(white)
        f = np.fft.rfftfreq(len(white), 1 / RATE)
        f[0] = f[1]
        spectrum /= np.sqrt(f) if colour == "pink" else f
        x = np.fft.irfft(spectrum, len(white))
    return (level * x / np.abs(x).max()).astype(np.float32)


def arpeggio(seconds: float, note_s: float = 0.2, decay: float = 3.0) -> np.ndarray:
    """C-E-G-C notes of 5 harmonics each, decaying: a synthetic music-like signal."""
    notes, out = (261.6, 329.6, 392.0, 523.3), []
    t = _t(note_s)
    for i in range(int(seconds / note_s)):
        f = notes[i % len(notes)]
        out.append(sum(0.2 / h * np.sin(2 * np.pi * f * h * t) for h in range(1, 6)) * np.exp(-decay * t))
    return np.concatenate(out).astype(np.float32)


def espeak(text: str, wpm: int = 160, voice: str = "en-us") -> np.ndarray:
    """``text`` spoken by espeak-ng, float32 16 kHz."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    from sub300.media.audio_file import read_audio

    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "s.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(wav), text], check=True,
                       capture_output=True)
        pcm = read_audio(wav, RATE)       # int16, resampled to 16 kHz
    return pcm.astype(np.float32) / 32768.0


# ------------------------------------------------------------------ the measures
@pytest.mark.parametrize("hz", [350, 440, 697, 1000, 1100, 1400, 2100])
@pytest.mark.parametrize("seconds", [0.2, 0.5, 1.0, 3.0])
def test_pure_tones_are_not_speech(hz, seconds):
    verdict = speech_guard.check(tones([hz], seconds))
    assert not verdict.is_speech, verdict


@pytest.mark.parametrize("digit", sorted(DTMF))
@pytest.mark.parametrize("seconds", [0.07, 0.1, 0.25])
def test_dtmf_heard_in_band_is_not_speech(digit, seconds):
    verdict = speech_guard.check(tones(DTMF[digit], seconds))
    assert not verdict.is_speech, verdict


def test_a_dialled_string_heard_in_band_is_not_speech():
    gap = np.zeros(int(0.1 * RATE), np.float32)
    digits = np.concatenate([np.concatenate([tones(DTMF[d], 0.1), gap]) for d in "5591#D1"])
    assert not speech_guard.check(digits).is_speech


def test_a_beating_ringback_cadence_is_not_speech():
    """UK ringback: 400+450 Hz (too close for a 32 ms frame: they beat), 0.4 on, 0.2 off, 0.4 on."""
    cadence = np.concatenate([tones((400, 450), 0.4), np.zeros(int(0.2 * RATE), np.float32), tones((400, 450), 0.4)])
    assert not speech_guard.check(cadence).is_speech


@pytest.mark.parametrize("freqs", [(440, 480), (350, 440), (480, 620), (913.8, 1370.6, 1776.7)],
                         ids=["ringback", "dialtone", "busy", "SIT"])
def test_dual_tones_and_sit_are_not_speech(freqs):
    assert not speech_guard.check(tones(freqs, 2.0)).is_speech
    # SIT plays its three tones one after another (ITU-T E.180 Annex A): ~330 ms each
    sequence = np.concatenate([tones([f], 0.33) for f in freqs])
    assert not speech_guard.check(sequence).is_speech


@pytest.mark.parametrize("colour", ["white", "pink", "brown"])
@pytest.mark.parametrize("level", [0.01, 0.1, 0.5])
def test_steady_noise_is_not_speech(colour, level):
    verdict = speech_guard.check(noise(colour, 1.5, level))
    assert not verdict.is_speech and "steady" in verdict.reason, verdict


@pytest.mark.parametrize("decay", [0.0, 3.0, 6.0, 10.0])
@pytest.mark.parametrize("note_s", [0.15, 0.25])
def test_synthetic_music_is_not_speech(decay, note_s):
    assert not speech_guard.check(arpeggio(2.0, note_s, decay=decay)).is_speech
    chord = sum(tones([f * h for h in range(1, 5)], 1.5) for f in (261.6, 329.6, 392.0))
    assert not speech_guard.check(chord).is_speech


@pytest.mark.parametrize("text", ["What is the capital of France?", "Nine.", "Yes.", "No.",
                                  "Please call me back tomorrow morning at nine.", "Mmm, okay."])
@pytest.mark.parametrize("voice", ["en-us", "en-us+f3"])
def test_spoken_words_are_speech(text, voice):
    audio = espeak(text, voice=voice)
    verdict = speech_guard.check(audio)
    assert verdict.is_speech, verdict
    quiet = speech_guard.check(audio * 0.02)            # a quiet caller is still a caller
    assert quiet.is_speech, quiet


def test_speech_over_steady_noise_is_speech():
    audio = espeak("What is the capital of France?")
    mixed = audio + noise("pink", len(audio) / RATE, 0.02, seed=3)[: len(audio)]
    assert speech_guard.check(mixed).is_speech


def test_too_short_or_silent_input_is_let_through():
    assert speech_guard.check(np.zeros(8000, np.int16)).is_speech
    assert speech_guard.check(np.zeros(100, np.float32)).is_speech


def test_the_measures_separate_a_tone_from_speech():
    tone, spoken = speech_guard.check(tones([1000], 1.0)), speech_guard.check(espeak("Hello there, how are you?"))
    assert tone.line_share > 0.95 > spoken.line_share
    assert tone.level_std_db < speech_guard.MIN_LEVEL_STD_DB < spoken.level_std_db


@pytest.mark.parametrize("text", ["(music)", "[BLANK_AUDIO]", "*beep*", "♪ ♪", "(bell dings) [Music]"])
def test_whisper_annotations_are_no_words(text):
    assert speech_guard.is_annotation(text)


@pytest.mark.parametrize("text", ["Hello (laughs)", "...", "", "One, two, three.", "Beep."])
def test_words_are_not_annotations(text):
    assert not speech_guard.is_annotation(text)


# ------------------------------------------------------------------ in a call
looptime = pytest.importorskip("looptime", reason="virtual time needs the test extra (looptime)")


def field_tone() -> np.ndarray:
    """The field case tone_1khz_1s.wav, regenerated: 0.5 s silence, a 1 kHz sine 1 s, 3 s silence (int16)."""
    sine = (0.5 * 32767 * np.sin(2 * np.pi * 1000 * _t(1.0))).astype(np.int16)
    return np.concatenate([np.zeros(RATE // 2, np.int16), sine, np.zeros(3 * RATE, np.int16)])


def ringback_burst() -> np.ndarray:
    """North American ringback: 440+480 Hz, 2 s on (one cadence), then 1 s of silence."""
    return np.concatenate([(tones((440, 480), 2.0, 0.3) * 32767).astype(np.int16), np.zeros(RATE, np.int16)])


def dtmf_digit() -> np.ndarray:
    """The digit 5 heard in-band for 250 ms (a long key press), then 1 s of silence."""
    return np.concatenate([(tones(DTMF["5"], 0.25, 0.5) * 32767).astype(np.int16), np.zeros(RATE, np.int16)])


async def _call(audio: np.ndarray, config, *, stt_text: str) -> ScriptedCaller:
    from sub300.models.vad_webrtc import WebRtcVad

    engines = fake_engines(vad=WebRtcVad(), stt=FakeStt(stt_text, delay_s=0.1))   # a real VAD, a fake Whisper
    caller = ScriptedCaller(engines, config, clock=asyncio.get_running_loop().time)
    try:
        await caller.silence(0.3)
        await caller.say(audio)
        await caller.silence(0.5)
        await caller.until_idle()
    finally:
        await caller.close()
    return caller


@pytest.mark.looptime
@pytest.mark.parametrize("make", [field_tone, ringback_burst, dtmf_digit])
async def test_a_tone_in_a_call_is_no_turn(make, config):
    caller = await _call(make(), copy.deepcopy(config), stt_text="Beep.")   # what Whisper says to a tone
    assert not [e for e in caller.events if isinstance(e, TurnFinished)]
    discarded = [e for e in caller.events if isinstance(e, TurnDiscarded)]
    assert discarded and all("not speech" in e.reason for e in discarded), discarded


@pytest.mark.looptime
async def test_without_the_guard_the_tone_becomes_a_turn(config):
    """The guard is what stops it (vad.speech_guard = false: the old behaviour)."""
    c = copy.deepcopy(config)
    c.vad.speech_guard = False
    caller = await _call(field_tone(), c, stt_text="Beep.")
    assert [e.transcript for e in caller.events if isinstance(e, TurnFinished)] == ["Beep."]


@pytest.mark.looptime
async def test_spoken_words_in_a_call_are_a_turn(config):
    spoken = (espeak("What is the capital of France?") * 32767 * 0.5).astype(np.int16)
    caller = await _call(spoken, copy.deepcopy(config), stt_text="What is the capital of France?")
    (turn,) = [e for e in caller.events if isinstance(e, TurnFinished)]
    assert turn.ledger.notes["guard_level_std_db"] >= speech_guard.MIN_LEVEL_STD_DB


# ------------------------------------------------------------------ real engines
@pytest.mark.slow
@pytest.mark.parametrize("text", ["What is the capital of France?", "Yes.", "No, thank you.",
                                  "Can you call me back at five?", "Hmm."])
def test_piper_speech_passes_the_guard(text):
    from tests.speech import speak

    spoken = speak(text)
    for gain in (1.0, 0.05):
        verdict = speech_guard.check((spoken * gain).astype(np.int16))
        assert verdict.is_speech, (text, gain, verdict)


@pytest.mark.slow
@pytest.mark.parametrize("make", [field_tone, ringback_burst, dtmf_digit])
def test_with_real_whisper_a_tone_is_no_turn(make, config):
    from sub300.agent.engines import Engines, _webrtc_vad, _whisper
    from sub300.testing.fakes import FakeLlm, FakeTts

    c = copy.deepcopy(config)

    async def call() -> ScriptedCaller:
        eng = Engines(vad=_webrtc_vad(c), stt=_whisper(c), llm=FakeLlm(["Sure."]), tts=FakeTts())
        caller = ScriptedCaller(eng, c)
        try:
            await caller.silence(0.3)
            await caller.say(make())
            await caller.until_idle(timeout=30)
        finally:
            await caller.close()
        return caller

    caller = asyncio.run(call())
    assert not [e for e in caller.events if isinstance(e, TurnFinished)]
