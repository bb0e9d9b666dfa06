"""A call's audio on disk (agent/recording.py): the caller and the agent as a 16 kHz stereo WAV, only when asked,
kept as the call's recording by the records store; a file that cannot be written never breaks the call."""
from __future__ import annotations

import asyncio
import json
import wave
from pathlib import Path

import numpy as np
import pytest

from sub300.agent.calls import CallContext
from sub300.agent.config import load_config
from sub300.agent.events import CallRecorded
from sub300.agent.recording import RECORDING_RATE, CallRecording, open_recording
from sub300.agent.records.observer import RecordsObserver
from sub300.agent.records.store import open_store
from sub300.testing.fakes import FakeLlm, FakeStt, FakeTts, fake_engines, speech, tone


def read_wav(path: Path) -> tuple[int, int, np.ndarray]:
    with wave.open(str(path), "rb") as w:
        frames = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, w.getnchannels())
        return w.getframerate(), w.getnchannels(), frames


def test_the_caller_left_the_agent_right_at_16_khz(tmp_path):
    recording = CallRecording(tmp_path / "c1.wav", agent_rate=48_000)
    voice = tone(400, RECORDING_RATE)                     # the caller: 400 ms, then 600 ms of silence
    reply = tone(300, 48_000)                 # the agent, at WebRTC's 48 kHz, after 500 ms
    for i in range(50):                                   # 50 frames of 20 ms on each side
        recording.caller(np.concatenate([voice, np.zeros(RECORDING_RATE, np.int16)])[i * 320:(i + 1) * 320])
        agent = np.concatenate([np.zeros(24_000, np.int16), reply, np.zeros(48_000, np.int16)])
        recording.agent(agent[i * 960:(i + 1) * 960])
    assert recording.close() == tmp_path / "c1.wav" and recording.close() == tmp_path / "c1.wav"   # idempotent
    rate, channels, frames = read_wav(tmp_path / "c1.wav")
    assert (rate, channels, len(frames)) == (RECORDING_RATE, 2, RECORDING_RATE)   # 1 s, both channels
    assert recording.seconds == 1.0
    caller, agent = frames[:, 0], frames[:, 1]
    np.testing.assert_array_equal(caller[:len(voice)], voice)
    assert not caller[len(voice):].any()
    loud = np.flatnonzero(np.abs(agent) > 1000)
    assert 0.49 < loud[0] / RECORDING_RATE < 0.51 and 0.79 < loud[-1] / RECORDING_RATE < 0.81   # 0.5-0.8 s


def test_the_shorter_channel_is_padded_and_an_empty_recording_leaves_no_file(tmp_path):
    recording = CallRecording(tmp_path / "c2.wav", agent_rate=16_000)
    recording.caller(tone(100, RECORDING_RATE))
    assert recording.close() == tmp_path / "c2.wav"
    rate, channels, frames = read_wav(tmp_path / "c2.wav")
    assert len(frames) == RECORDING_RATE // 10 and not frames[:, 1].any()
    empty = CallRecording(tmp_path / "c3.wav", agent_rate=8000)
    assert empty.close() is None and not (tmp_path / "c3.wav").exists()


def test_a_file_that_cannot_be_written_is_logged_removed_and_the_call_goes_on(tmp_path, caplog):
    recording = CallRecording(tmp_path / "c4.wav", agent_rate=16_000)

    def full(_data):
        raise OSError(28, "No space left on device")

    recording._file.writeframes = full                   # the disk fills up mid-call
    for _ in range(60):
        recording.caller(tone(20, RECORDING_RATE))
        recording.agent(tone(20, RECORDING_RATE))
    assert recording.failed and recording.close() is None and not (tmp_path / "c4.wav").exists()
    assert "No space left on device" in caplog.text and "goes on unrecorded" in caplog.text
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    config = load_config(environ={"SUB300_RECORDS_RECORD_AUDIO": "true", "SUB300_RECORDS_RECORDINGS_DIR": str(blocked)})
    assert open_recording(config, "c5", None, 16_000) is None and "cannot record call c5" in caplog.text


def test_only_a_key_or_the_configuration_asks_for_a_recording(tmp_path):
    quiet = load_config(environ={"SUB300_RECORDS_RECORDINGS_DIR": str(tmp_path)})
    assert open_recording(quiet, "c6", CallContext("k1"), 16_000) is None
    by_key = open_recording(quiet, "c7", CallContext("k1", record_audio=True), 16_000)
    assert by_key is not None and by_key.path == tmp_path / "c7.wav"
    by_config = load_config(environ={"SUB300_RECORDS_RECORDINGS_DIR": str(tmp_path), "SUB300_RECORDS_RECORD_AUDIO": "1"})
    assert open_recording(by_config, "c8", None, 16_000) is not None
    off = load_config(environ={"SUB300_RECORDS_RECORD_AUDIO": "1", "SUB300_RECORDS_ENABLED": "false"})
    assert open_recording(off, "c9", None, 16_000) is None       # no records kept: no recording either
    for r in (by_key,):
        r.close()


def test_the_caller_is_never_sent_the_recordings_path():
    from sub300.agent.events import event_to_dict

    assert event_to_dict(CallRecorded("/var/lib/sub300/recordings/c1.wav", 2.5)) == {"seconds": 2.5,
                                                                                      "kind": "call_recorded"}


async def test_the_records_keep_the_recording_and_forget_deletes_it(tmp_path):
    config = load_config(environ={"SUB300_RECORDS_URL": f"sqlite:///{tmp_path / 'r.db'}"})
    store = open_store(config)
    observer = RecordsObserver(store, config, purge_interval_s=None)
    wav = tmp_path / "c1.wav"
    wav.write_bytes(b"RIFF")
    listen = observer.call_started("pcm", "c1", CallContext("k1", record_audio=True))
    listen(CallRecorded(str(wav), 1.0))
    observer.call_ended("pcm", "c1", "caller hung up")
    await observer.aclose()
    doc = store.export_call("c1")
    assert doc["call"]["record_audio"] is True and doc["recording"] == str(wav)
    assert store.forget_call("c1", actor="test")["recording_deleted"] and not wav.exists()
    store.close()


@pytest.mark.looptime
async def test_a_ws_pcm_call_with_recording_on_leaves_a_stereo_wav(config, tmp_path):
    """The whole path on fake engines (named as such) and virtual time: the caller's speech on the left,
    the agent's tone on the right, announced as `CallRecorded` before the call's usage."""
    from .test_ws_pcm import PcmClient
    from .test_ws_twilio import App, no_call_left

    recorded = config.model_copy(deep=True)
    recorded.records.record_audio = True
    recorded.records.recordings_dir = str(tmp_path)
    engines = fake_engines(stt=FakeStt("Hello there?"), llm=FakeLlm(["Hi, how can I help?"]),
                           tts=FakeTts(ms_per_piece=300))
    async with App(recorded, engines) as app:
        client = PcmClient(await app.session.ws_connect(app.url("/ws/pcm?rate=16000")), 16_000)
        await client.speak(speech(0.4))
        await client.speak(np.zeros(int(16000 * 1.2), np.int16))
        await client.ws.send_str(json.dumps({"type": "hangup"}))
        await asyncio.wait_for(client.reader, 5)
        await no_call_left(app)
    call_id = client.texts[0]["call_id"]

    rate, channels, frames = read_wav(tmp_path / f"{call_id}.wav")
    assert (rate, channels) == (RECORDING_RATE, 2) and len(frames) >= 1.6 * RECORDING_RATE
    caller, agent = np.abs(frames[:, 0]), np.abs(frames[:, 1])
    first_voice, first_reply = np.flatnonzero(caller > 200)[0], np.flatnonzero(agent > 1000)[0]
    assert first_voice < first_reply                               # the caller spoke, then the agent answered
