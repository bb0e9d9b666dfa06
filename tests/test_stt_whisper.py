"""Whisper STT with the bundled tiny.en model, fed speech that espeak-ng makes at test time."""
from __future__ import annotations

import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from sub300.models.protocols import SAMPLE_RATE, ModelUnavailable, SpeechRecognizer
from sub300.models.stt_whisper import WhisperRecognizer, trim_repetition
from sub300.testing.wer import normalize, wer, word_errors

SENTENCE = "Please call me back tomorrow morning about the weather report."
KEY_WORDS = {"call", "tomorrow", "morning", "weather"}

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


def _read_16k(path: Path) -> np.ndarray:
    import av

    out = []
    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        for frame in container.decode(audio=0):
            out.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
        out.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    return np.concatenate(out).astype(np.float32)


def speak(text: str, tmp: Path) -> np.ndarray:
    wav = tmp / "speech.wav"
    subprocess.run(["espeak-ng", "-s", "150", "-w", str(wav), text], check=True, capture_output=True)
    return _read_16k(wav)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    return speak(SENTENCE, tmp_path_factory.mktemp("tts"))


@pytest.fixture(scope="module", params=["short", "window", "full"])
def recognizer(request) -> WhisperRecognizer:
    return WhisperRecognizer("bundled:whisper-tiny.en", device="cpu", cpu_threads=2, padding=request.param)


# ------------------------------------------------------------ real model
@pytest.mark.slow
@needs_espeak
def test_transcribes_spoken_sentence(recognizer, speech):
    assert isinstance(recognizer, SpeechRecognizer)
    assert recognizer.device == "cpu/int8"
    tr = recognizer.transcribe(speech)
    words = set(normalize(tr.text).split())
    assert words >= KEY_WORDS, tr.text
    assert tr.audio_seconds == pytest.approx(len(speech) / SAMPLE_RATE)
    assert tr.inference_seconds > 0
    # Whisper's own signals ride along (issue 9): clear speech is confidently speech
    assert tr.no_speech_prob is not None and 0.0 <= tr.no_speech_prob < 0.5, tr
    assert tr.avg_logprob is not None and -1.0 < tr.avg_logprob <= 0.0, tr


@pytest.mark.slow
def test_silence_and_empty_give_empty_text(recognizer):
    assert recognizer.transcribe(np.zeros(2 * SAMPLE_RATE, np.float32)).text == ""
    assert recognizer.transcribe(np.zeros(0, np.float32)).text == ""
    assert recognizer.transcribe(np.zeros(400, np.float32)).text == ""  # 25 ms
    quiet = np.random.default_rng(0).normal(0, 3e-4, 2 * SAMPLE_RATE).astype(np.float32)
    assert recognizer.transcribe(quiet).text == ""


@pytest.mark.slow
@needs_espeak
def test_concurrent_calls_from_two_threads(speech):
    rec = WhisperRecognizer("bundled:whisper-tiny.en", device="cpu", cpu_threads=1, padding="short")
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(rec.transcribe, [speech, speech[: len(speech) // 2]]))
    assert set(normalize(results[0].text).split()) >= KEY_WORDS, results[0].text
    assert results[1].text  # the first half of the sentence, whatever it says
    assert results[0].text == rec.transcribe(speech).text  # same answer as a lone call


@pytest.mark.slow
@needs_espeak
def test_short_mode_falls_back_to_full_past_30_seconds(speech):
    rec = WhisperRecognizer("bundled:whisper-tiny.en", device="cpu", padding="short")
    gap = np.zeros(SAMPLE_RATE, np.float32)
    long = np.concatenate([speech, gap] * (int(31 * SAMPLE_RATE / (len(speech) + len(gap))) + 1))
    assert len(long) > 30 * SAMPLE_RATE
    tr = rec.transcribe(long)
    assert "weather" in normalize(tr.text)


@pytest.mark.slow
@needs_espeak
@pytest.mark.parametrize("window_s", [3.0, 8.0, 15.0])
def test_window_mode_transcribes_at_several_window_lengths(speech, window_s):
    rec = WhisperRecognizer("bundled:whisper-tiny.en", device="cpu", cpu_threads=2, padding="window", window_s=window_s)
    assert rec.window_s == window_s
    tr = rec.transcribe(speech)
    assert set(normalize(tr.text).split()) >= KEY_WORDS, tr.text
    assert rec.transcribe(np.zeros(SAMPLE_RATE, np.float32)).text == ""


@pytest.mark.slow
def test_window_features_pad_to_the_window_but_not_past_30_seconds():
    rec = WhisperRecognizer("bundled:whisper-tiny.en", device="cpu", padding="window", window_s=10.0)

    def frames(seconds: float, w: float) -> int:
        return rec._features(np.zeros(int(seconds * SAMPLE_RATE), np.float32), w).shape[-1]

    assert 990 <= frames(2.0, 10.0) <= 1000  # padded up to the 10 s window
    assert 1290 <= frames(12.0, 10.0) <= 1300  # longer than the window: clip + 1 s
    assert 190 <= frames(1.0, 0.0) <= 200  # "short": clip + 1 s
    assert frames(29.8, 10.0) <= 3000 and frames(29.8, 10.0) % 2 == 0  # never past Whisper's window


@pytest.mark.slow
@needs_espeak
def test_window_mode_guard_fallback_is_counted(speech, monkeypatch):
    rec = WhisperRecognizer("bundled:whisper-tiny.en", device="cpu", cpu_threads=2, padding="window")
    monkeypatch.setattr(rec, "_transcribe_short", lambda audio, min_seconds=0.0: None)  # the guard trips
    tr = rec.transcribe(speech)
    assert set(normalize(tr.text).split()) >= KEY_WORDS, tr.text  # redone with full padding
    assert rec.fallbacks == 1


BATCH_SENTENCES = ["What is the capital of France?", "Please call me back tomorrow morning about the weather report.",
                   "Turn off the lights in the kitchen."]


@pytest.fixture(scope="module")
def piper_clips() -> list[np.ndarray]:
    from .speech import speak as piper_speak

    return [piper_speak(text).astype(np.float32) / 32768.0 for text in BATCH_SENTENCES]


@pytest.mark.slow
def test_a_batch_gives_the_single_path_transcripts(piper_clips):
    rec = WhisperRecognizer("bundled:whisper-tiny.en", device="cpu", cpu_threads=2)   # window padding, the default
    clips = [*piper_clips, np.zeros(SAMPLE_RATE, np.float32)]                         # silence: no model run
    single = [rec.transcribe(clip) for clip in clips]
    batch = rec.transcribe_batch(clips)
    assert [t.text for t in batch] == [t.text for t in single]
    assert all(normalize(t.text) == normalize(s) for t, s in zip(batch, BATCH_SENTENCES, strict=False)), batch
    for b, s in zip(batch, single, strict=True):
        assert b.audio_seconds == s.audio_seconds
        assert b.no_speech_prob == pytest.approx(s.no_speech_prob, abs=1e-3)
        assert b.avg_logprob == pytest.approx(s.avg_logprob, abs=1e-3)
    assert len({t.inference_seconds for t in batch}) == 1 and batch[0].inference_seconds > 0  # the batch's wall time
    assert batch[-1].text == "" and batch[-1].no_speech_prob is None


@pytest.mark.slow
def test_a_batch_keeps_the_guard_fallback(piper_clips, monkeypatch):
    rec = WhisperRecognizer("bundled:whisper-tiny.en", device="cpu", cpu_threads=2, padding="window")
    monkeypatch.setattr(rec, "_judge_short", lambda *args: None)      # every short decode trips a guard
    batch = rec.transcribe_batch(piper_clips[:2])
    assert [normalize(t.text) for t in batch] == [normalize(s) for s in BATCH_SENTENCES[:2]]   # redone padded
    assert rec.fallbacks == 2


# ------------------------------------------------------------ loading errors
def test_missing_local_directory_is_model_unavailable(tmp_path):
    with pytest.raises(ModelUnavailable):
        WhisperRecognizer(str(tmp_path / "no-such-model"), device="cpu")


def test_directory_without_weights_is_model_unavailable(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelUnavailable, match="model.bin"):
        WhisperRecognizer(str(tmp_path), device="cpu")


@pytest.mark.parametrize("name", ["sub300-test/not-a-cached-whisper", "distil-large-v3-not-a-size"])
def test_uncached_hub_name_without_download_is_model_unavailable_quickly(name):
    t0 = time.monotonic()
    with pytest.raises(ModelUnavailable):
        WhisperRecognizer(name, device="cpu", allow_download=False)
    assert time.monotonic() - t0 < 10


def test_unknown_bundled_name_is_model_unavailable():
    with pytest.raises(ModelUnavailable):
        WhisperRecognizer("bundled:whisper-huge", device="cpu")


def test_bad_padding_is_rejected():
    with pytest.raises(ValueError):
        WhisperRecognizer("bundled:whisper-tiny.en", device="cpu", padding="medium")


@pytest.mark.parametrize("window_s", [0.0, -1.0, 31.0])
def test_bad_window_is_rejected(window_s):
    with pytest.raises(ValueError, match="window_s"):
        WhisperRecognizer("bundled:whisper-tiny.en", device="cpu", padding="window", window_s=window_s)


# ------------------------------------------------------------ pure helpers
@pytest.mark.parametrize(
    "text, seconds, expected",
    [
        ("Thank you. Thank you. Thank you. Thank", 0.8, "Thank you."),
        ("added added added added", 0.6, "added"),
        ("Your call cannot be completed. Your call cannot be completed. Your", 2.0, "Your call cannot be completed."),
        ("bye bye", 0.8, "bye bye"),  # a normal rate: kept
        ("Press one to continue.", 2.0, "Press one to continue."),
    ],
)
def test_trim_repetition(text, seconds, expected):
    assert trim_repetition(text, seconds) == expected


@pytest.mark.parametrize(
    "reference, hypothesis",
    [
        ("please press one then pound", "Please press 1, then #."),
        ("one hundred and five", "105"),
        ("You're the twenty first caller; we can't wait!", "You are the 21st caller, we can not wait."),
        ("Um, Mr. Smith's call-forward", "Mister Smith's call forward."),
        ("press star to cancel", "Press * to cancel."),
        ("the colour grey", "The color gray."),
        ("This message lasts ...", "This message lasts."),
        ("you can not send audio", "You cannot send audio."),
        ("A.M.", "AM"),
    ],
)
def test_normalize_formatting_is_not_an_error(reference, hypothesis):
    assert normalize(reference) == normalize(hypothesis)
    assert word_errors(reference, hypothesis) == (0, len(normalize(reference).split()))


def test_normalize_drops_annotations():
    assert normalize("[this is a simple beep tone]") == ""


def test_word_errors_counts_edits():
    assert word_errors("press one then pound", "press 1 pound now") == (2, 4)  # a deletion, an insertion
    assert word_errors("thank you", "") == (2, 2)
    assert word_errors("[beep]", "hello there") == (2, 0)


def test_wer_counts_words_over_reference():
    assert wer(["Press one.", "Thank you"], ["press 1", "thank you very much"]) == pytest.approx(2 / 4)
