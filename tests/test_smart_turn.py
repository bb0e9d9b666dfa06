"""Smart Turn v3.2 (models/turn_smart.py) on the real ONNX model and real spoken audio (slow tier).

* our features are pipecat's: faster-whisper's FeatureExtractor on the normalised
  8 s window against pipecat's own ``_whisper_features.py``, loaded by file path
  from the installed pipecat-ai wheel (pipecat itself is never imported);
* a complete spoken sentence (Piper) sounds more complete than the same
  recording cut mid-phrase.  (Not every Piper sentence does: Smart Turn was
  trained on human speech, and "I would like to book a table for two people at
  the restaurant tonight." scores 0.06 with 100 ms of silence after it.)

The last two tests (a missing file, a missing package) load nothing: fast tier.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from sub300.models.protocols import SAMPLE_RATE

from .speech import silence, speak

SENTENCE = "I would like to book a table for two people at the restaurant tonight."    # features only


def pipecat_features_module():
    from importlib import metadata

    try:
        dist = metadata.distribution("pipecat-ai")
    except metadata.PackageNotFoundError:
        pytest.skip("pipecat-ai is not installed (scripts/setup.sh installs it --no-deps)")
    path = dist.locate_file("pipecat/audio/turn/smart_turn/_whisper_features.py")
    spec = importlib.util.spec_from_file_location("pipecat_whisper_features", str(path))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model():
    from sub300.models.turn_smart import SmartTurnModel

    return SmartTurnModel("bundled:smart-turn-v3.2", device="cpu", threads=1)


@pytest.mark.slow
def test_features_match_pipecats_reference():
    from sub300.models.turn_smart import SmartTurnFeatures, last_window

    reference = pipecat_features_module().compute_whisper_log_mel_features
    ours = SmartTurnFeatures()
    spoken = speak(SENTENCE).astype(np.float32) / 32768
    for audio in (spoken, np.tile(spoken, 4)):              # shorter than 8 s (padded), longer (cropped)
        expected = reference(last_window(audio), do_normalize=True)
        got = ours(audio)
        assert got.shape == expected.shape == (80, 800)
        assert np.abs(got - expected).max() < 1e-4
    # the window: the last 8 s, zero-padded at the start
    assert np.array_equal(last_window(np.ones(10, np.float32))[-10:], np.ones(10))
    assert not last_window(np.ones(10, np.float32))[:-10].any()


@pytest.mark.slow
@pytest.mark.parametrize("sentence", ["What is the capital of France?", "I want to order a large pizza with mushrooms."])
def test_a_complete_sentence_sounds_more_complete_than_the_same_cut_mid_phrase(model, sentence):
    pcm = speak(sentence)
    # cut at the quietest 30 ms of the middle fifth: the recording stops inside the sentence
    lo, hi, win = int(len(pcm) * 0.4), int(len(pcm) * 0.6), 480
    energy = [float(np.mean(pcm[k:k + win].astype(np.float64) ** 2)) for k in range(lo, hi, 80)]
    cut = lo + int(np.argmin(energy)) * 80 + win // 2
    tail = silence(0.1)      # scored at the silence onset, which the endpointer reports ~100 ms after the voice
    full = model.probability(np.concatenate([pcm, tail]).astype(np.float32) / 32768)
    half = model.probability(np.concatenate([pcm[:cut], tail]).astype(np.float32) / 32768)
    assert full >= 0.5 and full - half >= 0.3, (full, half, cut / SAMPLE_RATE)


def test_a_missing_file_is_a_clear_error():
    from sub300.models.protocols import ModelUnavailable
    from sub300.models.turn_smart import SmartTurnModel

    with pytest.raises(ModelUnavailable, match="no such ONNX file"):
        SmartTurnModel("/nonexistent/smart-turn.onnx")


def test_a_missing_package_names_the_install_command(monkeypatch):
    from importlib import metadata

    from sub300.models import bundled
    from sub300.models.protocols import ModelUnavailable

    def not_found(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_found)
    with pytest.raises(ModelUnavailable, match=r"pip install --no-deps pipecat-ai==1\.14\.0"):
        bundled.resolve_bundled("bundled:smart-turn-v3.2")
