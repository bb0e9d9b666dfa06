"""TTS engines: Piper (bundled joe voice) and espeak-ng."""
from __future__ import annotations

import os
import shutil
import threading

import numpy as np
import pytest

from sub300.models.protocols import ModelUnavailable, SpeechSynthesizer

#: the real engines (Piper, espeak-ng): the slow tier
pytestmark = pytest.mark.slow

SENTENCE = "Hello there. The weather in Paris is sunny today."

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng binary not installed")


@pytest.fixture(scope="module")
def piper():
    from sub300.models.tts_piper import PiperSynthesizer

    try:
        return PiperSynthesizer()
    except ModelUnavailable as exc:
        pytest.skip(f"bundled Piper voice unavailable: {exc}")


@pytest.fixture(scope="module")
def espeak():
    from sub300.models.tts_espeak import EspeakSynthesizer

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng binary not installed")
    return EspeakSynthesizer()


def _check_audio(chunks: list[np.ndarray], sample_rate: int) -> np.ndarray:
    assert chunks, "no audio"
    for c in chunks:
        assert isinstance(c, np.ndarray) and c.dtype == np.int16 and c.ndim == 1
    audio = np.concatenate(chunks)
    seconds = len(audio) / sample_rate
    assert 0.5 <= seconds <= 10.0, f"implausible duration {seconds:.2f} s"
    rms = np.sqrt(np.mean(audio.astype(np.float64) ** 2))
    assert rms > 500, f"audio nearly silent (rms {rms:.0f})"
    return audio


@pytest.fixture(params=["piper", "espeak"])
def engine(request):
    return request.getfixturevalue(request.param)


def test_protocol(engine):
    assert isinstance(engine, SpeechSynthesizer)
    assert engine.sample_rate == 22050


def test_sentence(engine):
    _check_audio(list(engine.synthesize(SENTENCE)), engine.sample_rate)


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text_yields_nothing(engine, text):
    assert list(engine.synthesize(text)) == []


def test_piper_one_chunk_per_sentence(piper):
    chunks = list(piper.synthesize(SENTENCE))
    assert len(chunks) == 2


def test_piper_concurrent_calls(piper):
    """Worker threads of different sessions may synthesize at once."""
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = _check_audio(list(piper.synthesize(f"Call number {i} says hello.")), piper.sample_rate)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert len(results) == 3


def test_piper_bad_voice(tmp_path):
    from sub300.models.tts_piper import PiperSynthesizer

    with pytest.raises(ModelUnavailable):
        PiperSynthesizer(str(tmp_path / "missing.onnx"))
    onnx = tmp_path / "voice.onnx"
    onnx.write_bytes(b"not a model")
    with pytest.raises(ModelUnavailable):  # no .onnx.json beside it
        PiperSynthesizer(str(onnx))
    (tmp_path / "voice.onnx.json").write_text("{}")
    with pytest.raises(ModelUnavailable):  # config lacks its fields
        PiperSynthesizer(str(onnx))
    with pytest.raises(ModelUnavailable):
        PiperSynthesizer("bundled:no-such-voice")


def test_piper_length_scale_slows_speech(piper):
    from sub300.models.tts_piper import PiperSynthesizer

    slow = PiperSynthesizer(length_scale=1.5)
    normal = len(np.concatenate(list(piper.synthesize(SENTENCE))))
    slower = len(np.concatenate(list(slow.synthesize(SENTENCE))))
    assert slower > normal * 1.2


@needs_espeak
def test_espeak_bad_voice_and_binary():
    from sub300.models.tts_espeak import EspeakSynthesizer

    with pytest.raises(ModelUnavailable):
        EspeakSynthesizer("xx-no-such-voice")
    with pytest.raises(ModelUnavailable):
        EspeakSynthesizer(binary="/nonexistent/espeak-ng")


def _children() -> set[int]:
    """PIDs of this process's children (including zombies), from /proc."""
    me = os.getpid()
    kids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # field 4 (ppid) follows the ")" that closes the command name
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:
            kids.add(int(entry))
    return kids


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_espeak_early_close_leaves_no_child(espeak):
    before = _children()
    long_text = " ".join(["This is a long sentence that keeps espeak busy for a while."] * 40)
    gen = espeak.synthesize(long_text)
    first = next(gen)
    assert first.dtype == np.int16 and len(first) > 0
    assert _children() - before, "espeak-ng should be running mid-stream"
    gen.close()
    assert not (_children() - before), "espeak-ng child left behind after close()"


def test_espeak_streams_before_finishing(espeak):
    """Long text arrives in several chunks, not as one blob at the end."""
    chunks = list(espeak.synthesize(" ".join([SENTENCE] * 3)))
    assert len(chunks) > 3
    _check_audio(chunks, espeak.sample_rate)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
async def test_bridged_espeak_cancelled_mid_stream_reaps_its_child(espeak):
    """The reply's path: synthesis through models.threads; barge-in closes it at once."""
    import asyncio
    import time

    from sub300.models.threads import iterate_in_thread

    before = _children()
    long_text = " ".join(["This is a long sentence that keeps espeak busy for a while."] * 40)
    chunks = iterate_in_thread(lambda: espeak.synthesize(long_text), name="tts")
    first = await chunks.__anext__()
    assert first.dtype == np.int16 and len(first) > 0
    t0 = time.monotonic()
    await chunks.aclose()
    assert time.monotonic() - t0 < 0.05  # the consumer does not wait for the worker
    deadline = time.monotonic() + 3
    while _children() - before and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not (_children() - before), "espeak-ng child left behind after the bridge closed"


async def test_bridged_piper_gives_every_sentence(piper):
    from sub300.models.threads import iterate_in_thread

    bridged = [c async for c in iterate_in_thread(lambda: piper.synthesize(SENTENCE))]
    assert len(bridged) == 2  # one chunk per sentence, as direct synthesis
    _check_audio(bridged, piper.sample_rate)
