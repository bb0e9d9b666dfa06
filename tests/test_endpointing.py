"""Endpointing on real webrtcvad and Silero with espeak-ng speech."""
from __future__ import annotations

import numpy as np
import pytest

from sub300.agent.endpointing import Endpointer, SpeechEnded, SpeechPaused, SpeechResumed, SpeechStarted
from sub300.models.vad_silero import SileroVad
from sub300.models.vad_webrtc import WebRtcVad

from .speech import RATE, compose, speak, voiced_span

FRAME = 320  # 20 ms, as transports deliver it


@pytest.fixture(scope="module")
def question() -> np.ndarray:
    return speak("What is the capital of France?")


@pytest.fixture(scope="module")
def other_question() -> np.ndarray:
    return speak("How many legs does a spider have?")


def run(audio: np.ndarray, vad, hangover_ms: int = 250, min_speech_ms: int = 100) -> list:
    endpointer = Endpointer(vad, min_speech_ms=min_speech_ms, hangover_ms=hangover_ms)
    events = []
    for i in range(0, len(audio) - FRAME + 1, FRAME):
        # timestamp = arrival of the frame's last sample on a clock that starts at 0
        events += endpointer.feed(audio[i:i + FRAME], (i + FRAME) / RATE)
    return events


VADS = [pytest.param(lambda: WebRtcVad(aggressiveness=3, frame_ms=20), id="webrtc"),
        pytest.param(lambda: SileroVad(), id="silero")]


@pytest.mark.parametrize("text", ["What is the capital of France?",
                                  "Tell me a joke about cats."])  # a soft final "ts" webrtcvad calls unvoiced
@pytest.mark.parametrize("engine", ["piper", "espeak"])
@pytest.mark.parametrize("make_vad", VADS)
def test_one_question_with_silence_around(make_vad, engine, text):
    audio = compose(1.0, speak(text, engine=engine), 1.5)
    events = run(audio, make_vad())
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    ends = [e for e in events if isinstance(e, SpeechEnded)]
    assert len(starts) == 1 and len(ends) == 1
    first, last = voiced_span(audio)
    end = ends[0]
    # The true end of speech is where the voice stops, not where the hangover expired.
    assert abs(end.speech_end - last) < 0.05, (end.speech_end, last)
    assert end.endpoint - end.speech_end == pytest.approx(0.25, abs=0.04)
    assert abs(starts[0].time - first) < 0.25
    assert end.end_sample == pytest.approx(end.speech_end * RATE, abs=1)


@pytest.mark.parametrize("make_vad", VADS)
def test_two_questions_give_two_turns(make_vad, question, other_question):
    audio = compose(0.6, question, 1.5, other_question, 1.0)
    ends = [e for e in run(audio, make_vad()) if isinstance(e, SpeechEnded)]
    assert len(ends) == 2
    assert ends[0].speech_end == pytest.approx(0.6 + len(question) / RATE, abs=0.05)
    assert ends[1].start_sample > ends[0].end_sample


@pytest.mark.parametrize("make_vad", VADS)
def test_silence_and_faint_noise_give_no_turn(make_vad):
    rng = np.random.default_rng(0)
    noise = (rng.normal(0, 30, 3 * RATE)).astype(np.int16)  # about -60 dBFS
    assert run(compose(2.0, noise, 1.0), make_vad()) == []


def test_pause_shorter_than_hangover_is_one_turn(question):
    audio = compose(0.5, question, 0.15, question, 1.0)
    events = run(audio, WebRtcVad(aggressiveness=3, frame_ms=20), hangover_ms=400)
    assert sum(isinstance(e, SpeechEnded) for e in events) == 1
    kinds = [type(e) for e in events]
    assert SpeechPaused in kinds and SpeechResumed in kinds


def test_a_click_is_not_speech(question):
    click = (np.hanning(160) * 20000).astype(np.int16)  # 10 ms
    events = run(compose(1.0, click, 1.0), WebRtcVad(aggressiveness=3, frame_ms=20), min_speech_ms=100)
    assert not any(isinstance(e, SpeechStarted) for e in events)


def test_odd_chunk_sizes_give_the_same_end(question):
    """Transports deliver 10, 20 or odd-sized chunks; timestamps must stay sample-exact."""
    audio = compose(0.5, question, 1.0)
    endpointer = Endpointer(WebRtcVad(frame_ms=30), min_speech_ms=100, hangover_ms=250)
    events, i = [], 0
    for size in [77, 513, 160, 999] * 1000:
        if i >= len(audio):
            break
        chunk = audio[i:i + size]
        i += len(chunk)
        events += endpointer.feed(chunk, i / RATE)
    reference = [e for e in run(audio, WebRtcVad(frame_ms=30)) if isinstance(e, SpeechEnded)]
    ends = [e for e in events if isinstance(e, SpeechEnded)]
    assert len(ends) == 1 == len(reference)
    assert ends[0].speech_end == pytest.approx(reference[0].speech_end, abs=1e-6)
