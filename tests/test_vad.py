"""VAD engines on real audio: espeak-ng speech, silence and low noise."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from sub300.models.protocols import ModelUnavailable, VadStream, VoiceActivityDetector
from sub300.models.vad_silero import SileroVad
from sub300.models.vad_webrtc import WebRtcVad

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng binary not installed")


def _decode_to_16k(path) -> np.ndarray:
    import av

    out = []
    resampler = av.AudioResampler(format="s16", layout="mono", rate=16000)
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            out.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
    out.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    return np.concatenate(out).astype(np.int16)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    """≈5 s of espeak-ng speech, 16 kHz mono int16."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng binary not installed")
    wav = tmp_path_factory.mktemp("vad") / "speech.wav"
    subprocess.run(
        ["espeak-ng", "-w", str(wav), "The quick brown fox jumps over the lazy dog. "
         "How are you doing today, my friend?"],
        check=True,
    )
    audio = _decode_to_16k(wav)
    assert 3.0 < len(audio) / 16000 < 8.0
    return audio


def _frames(audio: np.ndarray, n: int) -> list[np.ndarray]:
    return [audio[i:i + n] for i in range(0, len(audio) - n + 1, n)]


def _voiced(vad, audio: np.ndarray) -> np.ndarray:
    stream = vad.new_stream()
    probs = np.array([stream.speech_probability(f) for f in _frames(audio, vad.frame_samples)])
    assert ((probs >= 0.0) & (probs <= 1.0)).all()
    return probs >= vad.threshold


def _loud(audio: np.ndarray, n: int, floor: float = 300.0) -> np.ndarray:
    return np.array([np.sqrt(np.mean(f.astype(np.float64) ** 2)) > floor for f in _frames(audio, n)])


DETECTORS = [
    pytest.param(lambda: WebRtcVad(aggressiveness=2), id="webrtc-2-20ms"),
    pytest.param(lambda: WebRtcVad(aggressiveness=3, frame_ms=30), id="webrtc-3-30ms"),
    pytest.param(lambda: WebRtcVad(aggressiveness=0, frame_ms=10), id="webrtc-0-10ms"),
    pytest.param(lambda: SileroVad(), id="silero"),
]


@pytest.mark.parametrize("make", DETECTORS)
def test_implements_protocol(make):
    vad = make()
    assert isinstance(vad, VoiceActivityDetector)
    assert isinstance(vad.new_stream(), VadStream)
    assert 0.0 < vad.threshold < 1.0


@needs_espeak
@pytest.mark.parametrize("make", DETECTORS)
def test_speech_is_mostly_voiced(make, speech):
    vad = make()
    voiced = _voiced(vad, speech)
    loud = _loud(speech, vad.frame_samples)
    assert voiced.mean() > 0.6, f"only {voiced.mean():.0%} of all frames voiced"
    assert voiced[loud].mean() > 0.85, f"only {voiced[loud].mean():.0%} of loud frames voiced"


@pytest.mark.parametrize("make", DETECTORS)
def test_silence_and_low_noise_are_unvoiced(make):
    vad = make()
    rng = np.random.default_rng(1)
    silence = np.zeros(16000 * 2, dtype=np.int16)
    noise = rng.normal(0.0, 100.0, 16000 * 2).astype(np.int16)  # ≈ -50 dBFS hiss
    assert not _voiced(vad, silence).any()
    assert _voiced(vad, noise).mean() < 0.1


@pytest.mark.parametrize("make", DETECTORS)
def test_wrong_frame_size_raises(make):
    stream = make().new_stream()
    with pytest.raises(ValueError):
        stream.speech_probability(np.zeros(100, dtype=np.int16))


def test_webrtc_frame_samples_and_validation():
    assert WebRtcVad(frame_ms=10).frame_samples == 160
    assert WebRtcVad(frame_ms=20).frame_samples == 320
    assert WebRtcVad(frame_ms=30).frame_samples == 480
    with pytest.raises(ValueError):
        WebRtcVad(frame_ms=25)
    with pytest.raises(ValueError):
        WebRtcVad(aggressiveness=4)
    with pytest.raises(ValueError):
        WebRtcVad().new_stream().speech_probability(np.zeros(320, dtype=np.float32))


def test_silero_streams_are_independent(speech):
    """Two streams on the shared session keep separate state and context."""
    vad = SileroVad()
    a, b = vad.new_stream(), vad.new_stream()
    frames = _frames(speech, vad.frame_samples)
    alone = [vad.new_stream().speech_probability(f) for f in frames[:1]]
    ref = vad.new_stream()
    expected = [ref.speech_probability(f) for f in frames]
    got = []
    for f in frames:
        got.append(a.speech_probability(f))
        b.speech_probability(np.zeros_like(f))  # interleaved other call
    assert np.allclose(got, expected, atol=1e-6)
    assert alone[0] == pytest.approx(expected[0], abs=1e-6)


def test_silero_matches_faster_whisper_batch(speech):
    """Frame-by-frame streaming gives faster-whisper's own batched answer."""
    from faster_whisper.vad import SileroVADModel

    vad = SileroVad()
    n = vad.frame_samples
    audio = speech[: len(speech) // n * n]
    ref = SileroVADModel(str(vad.model_path))(audio.astype(np.float32) / 32768.0).reshape(-1)
    stream = vad.new_stream()
    mine = np.array([stream.speech_probability(f) for f in _frames(audio, n)])
    assert np.allclose(mine, ref, atol=1e-4)


def test_silero_missing_model(tmp_path):
    with pytest.raises(ModelUnavailable):
        SileroVad(tmp_path / "nope.onnx")
    with pytest.raises(ValueError):
        SileroVad(threshold=1.5)
