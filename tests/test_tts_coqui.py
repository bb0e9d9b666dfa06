"""The Coqui TTS engine on TINY RANDOM-WEIGHT models that the tests build with Coqui's own classes.

No Coqui voice can be fetched here: `sub300.testing.tiny_coqui` builds a VITS (and an XTTS)
of the real architecture, far smaller and untrained, saves it as a real download is laid
out, and the engine loads it back by path (or by name, from where Coqui keeps downloads).
The audio is noise, so these tests assert shapes, rates, durations against the text,
streaming order, cancellation and the errors — never words.  The test set-up installs the
extra (sub300[coqui]); without it these tests fail, they are not skipped.
"""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from sub300.agent.config import load_config
from sub300.agent.engines import TTS_ENGINES
from sub300.models.protocols import ModelUnavailable, SpeechSynthesizer
from sub300.models.scheduling import Urgency, WorkTicket
from sub300.models.tts_coqui import CoquiSynthesizer
from sub300.models.tts_service import ScheduledSynthesizer
from sub300.testing.tiny_coqui import (
    TINY_VITS_HOP_LENGTH,
    TINY_VITS_SAMPLE_RATE,
    TINY_XTTS_SAMPLE_RATE,
    TINY_XTTS_SPEAKER,
    build_tiny_vits,
    build_tiny_xtts,
)

#: real engines (PyTorch, Coqui's loading and inference code): the slow tier
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_vits_folder(tmp_path_factory) -> Path:
    return build_tiny_vits(tmp_path_factory.mktemp("coqui") / "tiny-vits")


@pytest.fixture(scope="module")
def vits(tiny_vits_folder) -> CoquiSynthesizer:
    return CoquiSynthesizer(tiny_vits_folder, device="cpu", threads=1)


def words(n: int) -> str:
    return " ".join(["hello"] * n) + "."


def test_a_folder_loads_by_path_into_the_protocol_with_the_models_rate(vits, tiny_vits_folder):
    assert isinstance(vits, SpeechSynthesizer)
    assert (vits.name, vits.model_type, vits.device, vits.streaming) == ("coqui", "vits", "cpu", False)
    assert vits.sample_rate == TINY_VITS_SAMPLE_RATE and vits.folder == tiny_vits_folder
    chunks = list(vits.synthesize("Hello there."))
    assert len(chunks) == 1
    chunk = chunks[0]
    assert chunk.dtype == np.int16 and chunk.ndim == 1
    assert len(chunk) > 0 and len(chunk) % TINY_VITS_HOP_LENGTH == 0   # whole decoder frames, no padding
    assert list(vits.synthesize("   ")) == []


def test_the_duration_grows_with_the_text(vits):
    lengths = [sum(len(c) for c in vits.synthesize(words(n))) for n in (1, 2, 4, 8)]
    assert lengths == sorted(set(lengths)), lengths                  # strictly longer with more words
    assert lengths[3] > 4 * lengths[0], lengths                       # roughly proportional, not a fixed length


def test_the_same_text_gives_the_same_audio(vits):
    first, second = np.concatenate(list(vits.synthesize("A fixed text."))), np.concatenate(
        list(vits.synthesize("A fixed text.")))
    np.testing.assert_array_equal(first, second)


def test_sentences_come_one_by_one_in_order(vits):
    sentences = ["Hi.", "How are you doing today?", "Fine, thanks, and you?"]
    alone = [np.concatenate(list(vits.synthesize(s))) for s in sentences]
    together = list(vits.synthesize(" ".join(sentences)))
    assert [len(c) for c in together] == [len(a) for a in alone]
    for got, want in zip(together, alone, strict=True):
        np.testing.assert_array_equal(got, want)


async def test_a_consumer_that_stops_reading_stops_the_synthesis_at_the_next_sentence(vits, monkeypatch):
    """Barge-in: the reply closes its stream after the first chunk; no further sentence is synthesized."""
    calls: list[str] = []
    real_tts = vits._coqui.tts

    def counting_tts(text, **kwargs):
        calls.append(text)
        time.sleep(0.05)   # a sentence takes a while, so the close lands while one is in progress
        return real_tts(text, **kwargs)

    monkeypatch.setattr(vits._coqui, "tts", counting_tts)
    threads_before = threading.active_count()
    service = ScheduledSynthesizer(vits, workers=1)
    text = " ".join(f"This is sentence number {n}." for n in range(12))
    stream = service.synthesize_async(text, ticket=WorkTicket(Urgency.COMMITTED, label="test"))
    first = await anext(stream)
    await stream.aclose()
    assert first.dtype == np.int16 and len(first) > 0
    await asyncio.sleep(0.5)                  # what an unstopped producer would use to go on
    assert len(calls) <= 2, calls             # the first sentence, at most the one in progress
    assert service.pool.waiting == 0
    for _ in range(50):                       # the worker thread has ended
        if threading.active_count() <= threads_before:
            break
        await asyncio.sleep(0.02)
    assert threading.active_count() <= threads_before


def test_the_configuration_chooses_the_engine_by_name(tiny_vits_folder, monkeypatch):
    monkeypatch.setenv("SUB300_TTS_ENGINE", "coqui")
    monkeypatch.setenv("SUB300_TTS_COQUI_MODEL", str(tiny_vits_folder))
    monkeypatch.setenv("SUB300_TTS_DEVICE", "cpu")
    config = load_config(None)
    engine = TTS_ENGINES[config.tts.engine](config)
    assert isinstance(engine, CoquiSynthesizer) and engine.folder == tiny_vits_folder and engine.device == "cpu"


def test_a_name_loads_from_coquis_download_folder_and_is_never_fetched(tiny_vits_folder, tmp_path, monkeypatch):
    """A Coqui name goes through the same loading code as a path: found where Coqui unpacks its
    downloads ($TTS_HOME/tts/<kind>--<lang>--<dataset>--<model>), refused when absent with downloads off."""
    monkeypatch.setenv("TTS_HOME", str(tmp_path))
    name = "tts_models/en/ljspeech/vits"
    with pytest.raises(ModelUnavailable, match="downloads are off"):
        CoquiSynthesizer(name, device="cpu")
    folder = tmp_path / "tts" / "tts_models--en--ljspeech--vits"
    folder.mkdir(parents=True)
    for file in tiny_vits_folder.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    engine = CoquiSynthesizer(name, device="cpu")
    assert engine.folder == folder and len(np.concatenate(list(engine.synthesize("Hi there.")))) > 0


def test_a_hub_hosted_name_is_looked_up_in_the_local_cache_only(tmp_path, monkeypatch, tiny_xtts_folder):
    """XTTS v2 by name: found in the Hugging Face cache where Coqui's manager downloads it (repository
    tts-hub/XTTS-v2, the cache's own layout), refused while it is not there."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    name = "tts_models/multilingual/multi-dataset/xtts_v2"
    with pytest.raises(ModelUnavailable, match="downloads are off"):
        CoquiSynthesizer(name, device="cpu")
    repo = tmp_path / "hub" / "models--tts-hub--XTTS-v2"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for file in tiny_xtts_folder.iterdir():
        (snapshot / file.name).symlink_to(file)
    engine = CoquiSynthesizer(name, device="cpu", stream_chunk_size=400)
    assert engine.folder == snapshot and engine.model_type == "xtts"
    assert [len(c) for c in engine.synthesize("Hi.")] == [XTTS_SENTENCE_SAMPLES]


@pytest.mark.parametrize("model, match", [
    ("tts_models/xx/nowhere/nothing", "unknown Coqui model"),
    ("/nonexistent/coqui/folder", "not a folder with config.json"),
    ("not-a-name", "not a folder with config.json"),
])
def test_a_bad_model_reference_is_a_clear_error(model, match):
    with pytest.raises(ModelUnavailable, match=match):
        CoquiSynthesizer(model, device="cpu")


def test_a_broken_folder_is_a_clear_error(tiny_vits_folder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelUnavailable, match="no config.json"):
        CoquiSynthesizer(empty, device="cpu")
    no_checkpoint = tmp_path / "no-checkpoint"
    no_checkpoint.mkdir()
    (no_checkpoint / "config.json").write_bytes((tiny_vits_folder / "config.json").read_bytes())
    with pytest.raises(ModelUnavailable, match="no checkpoint"):
        CoquiSynthesizer(no_checkpoint, device="cpu")
    (no_checkpoint / "model.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelUnavailable, match="cannot load the Coqui model"):
        CoquiSynthesizer(no_checkpoint, device="cpu")


def test_cuda_without_a_gpu_is_refused_not_hidden(tiny_vits_folder):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: this checks the refusal on a machine without one")
    with pytest.raises(ModelUnavailable, match="sees no CUDA device"):
        CoquiSynthesizer(tiny_vits_folder, device="cuda")


def test_a_voice_recording_needs_a_model_that_clones(tiny_vits_folder, tmp_path):
    with pytest.raises(ModelUnavailable, match="clones voices"):
        CoquiSynthesizer(tiny_vits_folder, device="cpu", speaker_wav=tmp_path / "voice.wav")


def test_a_multi_speaker_model_speaks_with_the_speaker_asked_for(tmp_path, tiny_vits_folder):
    folder = build_tiny_vits(tmp_path / "two-voices", speakers=["ana", "bob"])
    first = CoquiSynthesizer(folder, device="cpu")
    ana, bob = (CoquiSynthesizer(folder, device="cpu", speaker=name) for name in ("ana", "bob"))
    assert (first.speaker, ana.speaker, bob.speaker) == ("ana", "ana", "bob")     # none asked: the first
    said = {e.speaker + str(i): np.concatenate(list(e.synthesize("Hello there."))) for i, e in enumerate((first, ana, bob))}
    np.testing.assert_array_equal(said["ana0"], said["ana1"])
    assert len(said["ana1"]) != len(said["bob2"]) or not np.array_equal(said["ana1"], said["bob2"])
    with pytest.raises(ModelUnavailable, match="'carl' is not among"):
        CoquiSynthesizer(folder, device="cpu", speaker="carl")
    with pytest.raises(ModelUnavailable, match="which has one voice"):
        CoquiSynthesizer(tiny_vits_folder, device="cpu", speaker="ana")


async def test_a_call_hears_the_engine_resampled_with_the_ledgers_tts_marks(vits, config):
    """The whole path: a /ws/pcm caller at 8 kHz (fake STT and LLM, named as such; the real Coqui engine on
    the tiny VITS behind the shared TTS service) hears the reply at its own rate, and the turn's ledger
    has the TTS marks in order."""
    from sub300.testing.fakes import FakeLlm, FakeStt, fake_engines, speech

    from .test_ws_pcm import PcmClient
    from .test_ws_twilio import App, no_call_left

    engines = fake_engines(stt=FakeStt("Hello there?"), llm=FakeLlm(["Hi. How can I help you today?"]))
    engines.tts = ScheduledSynthesizer(vits, workers=1)
    rate = 8000
    async with App(config, engines, own_engines=False) as app:
        client = PcmClient(await app.session.ws_connect(app.url(f"/ws/pcm?rate={rate}")), rate)
        await client.speak(speech(0.4))
        await client.speak(np.zeros(int(16000 * 1.5), np.int16))
        for _ in range(200):
            if "turn" in client.kinds():
                break
            await asyncio.sleep(0.05)
        await client.ws.close()
        await asyncio.wait_for(client.reader, 5)
        await no_call_left(app)
    turn = next(t for t in client.texts if t["kind"] == "turn")
    marks = turn["ledger"]["marks_ms"]
    assert client.frame_bytes == {rate // 50 * 2}
    assert np.abs(np.concatenate(client.audio)).max() > 100      # the tiny model's noise arrived
    assert 0 < marks["tts_start"] <= marks["tts_first_audio"] <= marks["first_audio_out"], marks
    assert turn["ledger"]["work_ms"]["tts"] > 0 and turn["ledger"]["notes"]["engines"]["tts"] == "coqui"


# ---------------------------------------------------------------- XTTS: streamed
#: the tiny XTTS's random GPT never emits its stop token: every sentence is 37 audio tokens
XTTS_SENTENCE_SAMPLES = 41_216


@pytest.fixture(scope="module")
def tiny_xtts_folder(tmp_path_factory) -> Path:
    return build_tiny_xtts(tmp_path_factory.mktemp("coqui") / "tiny-xtts")


@pytest.fixture(scope="module")
def xtts(tiny_xtts_folder) -> CoquiSynthesizer:
    return CoquiSynthesizer(tiny_xtts_folder, device="cpu", threads=2, stream_chunk_size=10)


class Progress:
    """Counts, with forward hooks on the real modules, the XTTS GPT's forward passes (a prefill, then one per
    audio token) and the HiFi-GAN decoder's runs (one per streamed chunk)."""

    def __init__(self, engine: CoquiSynthesizer) -> None:
        self.model = engine._model
        self.gpt = self.decoder = 0

    def __enter__(self) -> Progress:
        def gpt(*_):
            self.gpt += 1

        def decoder(*_):
            self.decoder += 1

        self.hooks = [self.model.gpt.gpt_inference.register_forward_hook(gpt),
                      self.model.hifigan_decoder.register_forward_hook(decoder)]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()


def test_xtts_loads_as_a_streaming_engine_with_its_speaker_file(xtts, tiny_xtts_folder):
    assert isinstance(xtts, SpeechSynthesizer)
    assert (xtts.model_type, xtts.streaming, xtts.sample_rate) == ("xtts", True, TINY_XTTS_SAMPLE_RATE)
    assert (xtts.speaker, xtts.language, xtts.folder) == (TINY_XTTS_SPEAKER, "en", tiny_xtts_folder)


def test_xtts_chunks_leave_while_the_gpt_is_still_generating(xtts):
    with Progress(xtts) as progress:
        seen = [(chunk, progress.gpt, progress.decoder) for chunk in xtts.synthesize("Hello world.")]
        gpt_passes = progress.gpt
    assert [decoded for _, _, decoded in seen] == [1, 2, 3, 4]   # 37 tokens by 10: a chunk per decoder run
    assert seen[0][1] <= 1 + 10 < gpt_passes                     # the first was out after 10 of the 37 tokens
    assert [passes for _, passes, _ in seen] == sorted({passes for _, passes, _ in seen})
    assert all(chunk.dtype == np.int16 and chunk.ndim == 1 and len(chunk) for chunk, _, _ in seen)
    assert sum(len(chunk) for chunk, _, _ in seen) == XTTS_SENTENCE_SAMPLES


def test_xtts_streamed_chunks_add_up_to_the_unstreamed_audio(xtts, tiny_xtts_folder):
    whole = CoquiSynthesizer(tiny_xtts_folder, device="cpu", threads=2, stream_chunk_size=400)
    assert [len(c) for c in whole.synthesize("Hello world.")] == [XTTS_SENTENCE_SAMPLES]
    assert len(list(xtts.synthesize("Hello world."))) == 4


def test_xtts_streams_sentence_after_sentence(xtts):
    one = [len(c) for c in xtts.synthesize("Hi there.")]
    assert [len(c) for c in xtts.synthesize("Hi there. How are you today?")] == one + one


async def test_xtts_barge_in_stops_the_gpt_at_the_next_chunk(xtts):
    service = ScheduledSynthesizer(xtts, workers=1)
    text = "This is a long answer. It has three sentences. Nobody will hear the rest."
    with Progress(xtts) as progress:
        stream = service.synthesize_async(text, ticket=WorkTicket(Urgency.COMMITTED, label="test"))
        first = await anext(stream)
        await stream.aclose()
        await asyncio.sleep(2.0)            # unstopped, the GPT went on: 30 passes and 2 chunks after 1 s here
        passes, decoded = progress.gpt, progress.decoder
    assert first.dtype == np.int16 and len(first) > 0
    assert decoded <= 2, decoded              # the first chunk's run, at most the one in progress
    assert passes <= 1 + 2 * 10, passes       # not the 3 x 38 passes of the whole text


def write_wav(path: Path, seconds: float, rate: int = 16_000) -> Path:
    import wave

    t = np.arange(int(seconds * rate)) / rate
    pcm = (8000 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return path


def test_xtts_clones_a_voice_from_a_recording_decoded_by_pyav(tiny_xtts_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))                  # the README writes the path as ~/voices/me.wav
    write_wav(tmp_path / "me.wav", 2.0)
    engine = CoquiSynthesizer(tiny_xtts_folder, device="cpu", speaker_wav="~/me.wav")
    latent, embedding = engine._latents
    assert tuple(latent.shape) == (1, 32, 64) and tuple(embedding.shape) == (1, 512, 1)
    stored = engine._model.speaker_manager.speakers[TINY_XTTS_SPEAKER]["speaker_embedding"]
    assert not np.allclose(embedding.numpy(), stored.numpy())          # this voice, not the speaker file's
    assert sum(len(c) for c in engine.synthesize("Hello.")) == XTTS_SENTENCE_SAMPLES


def test_xtts_voice_errors_are_clear(tiny_xtts_folder, tmp_path):
    with pytest.raises(ModelUnavailable, match="needs >= 0.33 s"):
        CoquiSynthesizer(tiny_xtts_folder, device="cpu", speaker_wav=write_wav(tmp_path / "short.wav", 0.1))
    (tmp_path / "not-audio.wav").write_text("hello")
    with pytest.raises(ModelUnavailable, match="cannot read the voice recording"):
        CoquiSynthesizer(tiny_xtts_folder, device="cpu", speaker_wav=tmp_path / "not-audio.wav")
    with pytest.raises(ModelUnavailable, match="'Nobody' is not in .*speaker file: Tiny Speaker$"):
        CoquiSynthesizer(tiny_xtts_folder, device="cpu", speaker="Nobody")


def test_xtts_languages_are_checked_at_load(tiny_xtts_folder):
    with pytest.raises(ModelUnavailable, match=r"language 'xx' is not one of .*: en, es, fr, de, it, pt, pl, tr, \.\.\. \(17 in all\)"):
        CoquiSynthesizer(tiny_xtts_folder, device="cpu", language="xx")
    assert CoquiSynthesizer(tiny_xtts_folder, device="cpu", language="de").language == "de"


def test_a_licence_to_accept_stops_an_allowed_download_before_it_starts(tmp_path, monkeypatch):
    """XTTS v2's CPML must be accepted: Coqui would ask on stdin, which a server has not."""
    monkeypatch.setenv("TTS_HOME", str(tmp_path))
    monkeypatch.delenv("COQUI_TOS_AGREED", raising=False)
    with pytest.raises(ModelUnavailable, match="set COQUI_TOS_AGREED=1"):
        CoquiSynthesizer("tts_models/multilingual/multi-dataset/xtts_v2", device="cpu", allow_download=True)
    assert not (tmp_path / "tts").exists() or not any((tmp_path / "tts").iterdir())   # nothing made, nothing fetched


def test_a_speaker_and_a_recording_together_are_a_configuration_error():
    from sub300.agent.config import ConfigError

    with pytest.raises(ConfigError, match="coqui_speaker and coqui_speaker_wav are both set"):
        load_config(environ={"SUB300_TTS_COQUI_SPEAKER": "Ana", "SUB300_TTS_COQUI_SPEAKER_WAV": "/tmp/me.wav"})
