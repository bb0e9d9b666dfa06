"""WebRTC calls without a browser: an aiortc caller against the real app, in process.

The app is the one `sub300 serve` runs (build_app), on 127.0.0.1 with the
real engines; the caller is media/webrtc/client.py.  Faster than the browser
tests and catches the same regressions in signalling, audio in and out, the
data channel and teardown.
"""
from __future__ import annotations

import asyncio
import copy
import json
import re

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestServer
from aiortc import RTCPeerConnection

from sub300.testing.aiortc_caller import AiortcCaller
from sub300.web.server import METRICS_KEY, SIGNALLING_KEY, build_app

from .speech import compose, speak
from .test_recording import read_wav

pytestmark = pytest.mark.slow
TURN_TIMEOUT = 90   # 2 slow cores: STT + LLM + TTS of one turn, with margin


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


@pytest.fixture(scope="module")
def question():
    return compose(0.8, speak("What is the capital of France?"), 1.2)


@pytest.fixture(scope="module")
def long_question():
    return compose(0.8, speak("Tell me a long story about a dragon and a knight."), 1.2)


class Server:
    def __init__(self, config, engines):
        self.app = build_app(config, engines)
        self.server = TestServer(self.app, host="127.0.0.1")

    async def __aenter__(self):
        await self.server.start_server()
        self.url = str(self.server.make_url("")).rstrip("/")
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc):
        await self.session.close()
        await self.server.close()

    @property
    def signalling(self):
        return self.app[SIGNALLING_KEY]

    @property
    def metrics(self):
        return self.app[METRICS_KEY]

    def caller(self) -> AiortcCaller:
        return AiortcCaller(self.url, self.session)


def live_pipeline_tasks() -> list[asyncio.Task]:
    """Tasks still running code of a conversation, a reply or a WebRTC call."""
    out = []
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        name = getattr(code, "co_qualname", "")
        module = getattr(task.get_coro(), "__qualname__", "")
        if not task.done() and (name.startswith(("Conversation.", "WebRtcCall.", "speak_reply", "read_caller_audio"))
                                or module.startswith(("Conversation.", "WebRtcCall."))):
            out.append(task)
    return out


async def wait_until(predicate, timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


async def test_page_health_metrics_and_config_are_served(config, engines):
    async with Server(config, engines) as s:
        async with s.session.get(s.url + "/") as r:
            assert r.status == 200 and "sub300" in await r.text()
        for asset in ("app.js", "latency.js", "meter-worklet.js", "style.css"):
            async with s.session.get(f"{s.url}/static/{asset}") as r:
                assert r.status == 200, asset
        async with s.session.get(s.url + "/webrtc/config") as r:
            body = await r.json()
            assert body["iceServers"] == [] and body["budget_ms"] == config.budget_ms
        async with s.session.get(s.url + "/metrics") as r:
            text = await r.text()
            assert r.status == 200 and 'sub300_calls_active{transport="webrtc"} 0.0' in text
            assert "sub300_voice_to_voice_seconds" in text and "sub300_goodput_ratio" in text
        async with s.session.get(s.url + "/healthz") as r:
            assert (await r.json())["status"] == "ok"


async def test_call_answers_a_spoken_question_over_webrtc(config, engines, question, tmp_path):
    config = config.model_copy(deep=True)        # and records the call (agent/recording.py)
    config.records.record_audio, config.records.recordings_dir = True, str(tmp_path)
    async with Server(config, engines) as s:
        caller = s.caller()
        await caller.connect()
        assert s.metrics.active_calls("webrtc") == 1
        caller.say(question)
        (turn,) = await caller.wait_for_turns(1, TURN_TIMEOUT)
        finals = [e for e in caller.events_of("transcript") if e["final"]]
        assert {"capital", "france"} <= words(finals[0]["text"]), finals
        assert caller.events_of("hello") and caller.events_of("agent_text")
        assert {e["state"] for e in caller.events_of("state")} >= {"caller_speaking", "thinking", "agent_speaking"}
        ledger = turn["ledger"]
        assert ledger["voice_to_voice_ms"] > 0
        assert sum(ledger["stages_ms"].values()) == pytest.approx(ledger["voice_to_voice_ms"], abs=0.5)
        # the agent's voice reached the caller, and the caller could time it
        assert caller.received_energy > 0
        assert caller.onsets and caller.onsets[0].mouth_to_ear_ms > 0
        # the caller reported its ear; the ledger has both mouth-to-ear figures (media/webrtc/ear_report.py)
        await caller.wait_for(lambda: bool(caller.events_of("turn_heard")), 5, "turn_heard")
        heard = caller.events_of("turn_heard")[0]["ledger"]
        assert heard["mouth_to_ear_reported_ms"] == pytest.approx(caller.onsets[0].mouth_to_ear_ms, abs=0.1)
        assert heard["marks_ms"]["first_audio_heard"] >= heard["marks_ms"]["first_audio_out"]
        assert heard["mouth_to_ear_estimate_ms"] > heard["voice_to_voice_ms"]
        assert {"jitter_buffer_in", "jitter_buffer_out", "network_out"} <= heard["transport_ms"].keys()
        await caller.hang_up()
        await wait_until(lambda: not s.signalling.calls, 10, "the call to end")
        assert s.metrics.active_calls() == 0
        metrics = s.metrics.render().decode()
        assert 'sub300_turns_total{outcome="answered",transport="webrtc"} 1.0' in metrics
        assert 'sub300_calls_ended_total{reason="hangup",transport="webrtc"} 1.0' in metrics
        assert 'sub300_voice_to_voice_seconds_count{transport="webrtc"} 1.0' in metrics
        assert 'sub300_mouth_to_ear_estimate_seconds_count{transport="webrtc"} 1.0' in metrics
        assert 'sub300_mouth_to_ear_reported_seconds_count{transport="webrtc"} 1.0' in metrics
    rate, channels, frames = read_wav(tmp_path / f"{caller.call_id}.wav")   # the caller left, the agent right
    caller_side, agent_side = np.abs(frames[:, 0].astype(np.int32)), np.abs(frames[:, 1].astype(np.int32))
    assert (rate, channels) == (16_000, 2) and len(frames) > 3 * rate
    assert np.flatnonzero(caller_side > 1000)[0] < np.flatnonzero(agent_side > 1000)[0]   # asked, then answered


async def test_caller_vanishing_mid_reply_tears_the_call_down(config, engines, long_question):
    async with Server(config, engines) as s:
        caller = s.caller()
        await caller.connect()
        call = s.signalling.calls[caller.call_id]
        caller.say(long_question)
        await caller.wait_for(lambda: bool(caller.onsets), TURN_TIMEOUT, "agent audio")
        assert not call.playout.idle, "the reply should still be playing"
        assert live_pipeline_tasks(), "the task finder should see the live call's tasks"
        await caller.vanish()
        await wait_until(lambda: call.closed, 15, "the server to notice")
        # aiortc's goodbye (RTCP BYE, DTLS close) ends the track or the connection, whichever comes first
        assert call.close_reason in ("track_ended", "connection_closed", "connection_failed"), call.close_reason
        assert not s.signalling.calls and s.metrics.active_calls() == 0
        assert not call.conversation._tasks, call.conversation._tasks
        assert call.reader is not None and call.reader.done()
        assert call.out_track.readyState == "ended" and call.pc.connectionState == "closed"
        await asyncio.sleep(0.2)  # let cancelled tasks unwind
        assert not live_pipeline_tasks(), live_pipeline_tasks()


async def test_the_agent_hangs_up_after_saying_goodbye(config, engines):
    brief = copy.deepcopy(config)
    brief.llm.max_tokens = 16   # the whole farewell plays before the hang-up: keep it short
    async with Server(brief, engines) as s:
        caller = s.caller()
        await caller.connect()
        call = s.signalling.calls[caller.call_id]
        caller.say(compose(0.8, speak("Okay goodbye now."), 1.0))  # one breath: no pause to split the turn
        await caller.wait_for(lambda: bool(caller.events_of("hangup")), TURN_TIMEOUT, "hang-up event")
        await wait_until(lambda: call.closed, 10, "the server to hang up")
        assert call.close_reason == "agent_hangup" and not s.signalling.calls
        await caller.wait_for(lambda: caller.pc.connectionState == "closed", 10, "the caller to see it")
        await caller.vanish()


async def _post(s: Server, data: bytes, content_type: str = "application/json") -> tuple[int, str]:
    async with s.session.post(s.url + "/offer", data=data, headers={"Content-Type": content_type}) as r:
        body = await r.json()
        return r.status, body.get("error", "")


async def test_bad_signalling_gets_a_clear_4xx_and_the_server_keeps_serving(config, engines):
    async with Server(config, engines) as s:
        status, error = await _post(s, b"{not json")
        assert status == 400 and "JSON" in error
        status, error = await _post(s, b'["sdp"]')
        assert status == 400 and "object" in error
        status, error = await _post(s, b'{"sdp": "hello there", "type": "offer"}')
        assert status == 400 and "SDP" in error
        status, error = await _post(s, b'{"sdp": "v=0\\r\\n", "type": "answer"}')
        assert status == 400 and '"type"' in error
        status, error = await _post(s, b'{"sdp": "v=0' + b"x" * 300_000 + b'", "type": "offer"}')
        assert status == 413 and "too large" in error
        # an offer with only a data channel: valid SDP, but no microphone
        pc = RTCPeerConnection()
        pc.createDataChannel("events")
        await pc.setLocalDescription(await pc.createOffer())
        await pc.close()
        status, error = await _post(s, json.dumps({"sdp": pc.localDescription.sdp, "type": "offer"}).encode())
        assert status == 400 and "no audio" in error, error
        # SDP with audio that aiortc cannot negotiate (no ICE credentials)
        sdp = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n" \
              "c=IN IP4 0.0.0.0\r\na=rtpmap:111 opus/48000/2\r\na=sendrecv\r\n"
        async with s.session.post(s.url + "/offer", json={"sdp": sdp, "type": "offer"}) as r:
            assert r.status == 400 and "ICE" in (await r.json())["error"]
        assert not s.signalling.calls and s.metrics.active_calls() == 0
        # and the next caller is served
        caller = s.caller()
        await caller.connect()
        assert s.metrics.active_calls() == 1
        await caller.hang_up()
        await wait_until(lambda: not s.signalling.calls, 10, "the call to end")


async def test_callers_beyond_max_calls_get_503(config, engines):
    limited = copy.deepcopy(config)
    limited.webrtc.max_calls = 1
    async with Server(limited, engines) as s:
        first = s.caller()
        await first.connect()
        with pytest.raises(ConnectionError, match="503"):
            await s.caller().connect()
        await first.hang_up()
        await wait_until(lambda: not s.signalling.calls, 10, "the call to end")
        second = s.caller()
        await second.connect()   # a slot is free again
        await second.hang_up()
        await wait_until(lambda: not s.signalling.calls, 10, "the call to end")


def test_stereo_decoded_audio_is_averaged_not_summed():
    import av

    from sub300.media.webrtc.inbound import to_mono_int16

    loud = np.full(960 * 2, 30_000, np.int16).reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(loud, format="s16", layout="stereo")
    frame.sample_rate = 48_000
    assert to_mono_int16(frame).max() == 30_000


def test_metrics_observer_counts_turns_and_goodput_per_registry():
    from sub300.agent.events import TurnDiscarded, TurnFinished
    from sub300.agent.ledger import TurnLedger
    from sub300.agent.metrics import MetricsObserver

    def finished(turn: int, v2v_s: float) -> TurnFinished:
        ledger = TurnLedger(turn)
        for mark, at in (("speech_end", 10.0), ("endpoint", 10.1), ("stt_final", 10.15),
                         ("llm_first_token", 10.17), ("first_piece", 10.2), ("tts_first_audio", 10.22),
                         ("first_audio_out", 10.0 + v2v_s)):
            ledger.mark(mark, at)
        return TurnFinished(turn, "q", "a", ledger)

    a, b = MetricsObserver(budget_ms=300), MetricsObserver(budget_ms=300)   # two apps, two registries
    listen = a.call_started("webrtc", "c1")
    listen(finished(1, 0.25))
    listen(finished(2, 0.9))
    listen(TurnDiscarded(3, "cough"))
    assert a.active_calls() == 1 and b.active_calls() == 0
    a.call_ended("webrtc", "c1", "connection_failed")
    text = a.render().decode()
    assert "sub300_goodput_ratio 0.5" in text
    assert 'sub300_turns_total{outcome="discarded",transport="webrtc"} 1.0' in text
    assert 'sub300_stage_seconds_count{stage="send",transport="webrtc"} 2.0' in text
    assert 'sub300_voice_to_voice_seconds_bucket{le="0.3",transport="webrtc"} 1.0' in text
    assert 'sub300_calls_ended_total{reason="connection_failed",transport="webrtc"} 1.0' in text
    assert a.active_calls() == 0 and "sub300_goodput_ratio NaN" in b.render().decode()


# ------------------------------------------------------------ calls that hold a slot (fake engines, real aiortc)
async def test_a_silent_caller_hears_the_goodbye_and_is_hung_up_on(config):
    from sub300.testing.fakes import fake_engines

    brief = copy.deepcopy(config)
    brief.call.inactivity_timeout_s = 2.0
    async with Server(brief, fake_engines()) as s:
        caller = s.caller()
        await caller.connect()
        call = s.signalling.calls[caller.call_id]
        assert caller.received_energy == 0.0
        await caller.wait_for(lambda: bool(caller.events_of("hangup")), 15, "hang-up event")
        await wait_until(lambda: call.closed, 10, "the server to hang up")
        assert call.close_reason == "agent_hangup: inactivity" and not s.signalling.calls
        assert s.metrics.active_calls() == 0
        # the goodbye (FakeTts: 500 ms of a 440 Hz tone) reached the caller before the hang-up
        assert [e["text"] for e in caller.events_of("agent_text")] == [brief.call.inactivity_goodbye]
        assert caller.received_energy > 100.0, caller.received_energy
        await caller.vanish()
        await asyncio.sleep(0.2)
        assert not live_pipeline_tasks(), live_pipeline_tasks()


async def test_a_caller_that_vanishes_without_a_word_is_freed_within_the_no_media_timeout(config):
    import time

    from sub300.testing.fakes import fake_engines

    quick = copy.deepcopy(config)
    quick.webrtc.no_media_timeout_s = 1.5
    async with Server(quick, fake_engines()) as s:
        caller = s.caller()
        await caller.connect()
        call = s.signalling.calls[caller.call_id]
        await asyncio.sleep(0.5)
        assert call.last_audio is not None       # the caller's silence arrives as audio
        gone = time.monotonic()
        caller.disappear()                       # no BYE, no DTLS close, no SCTP abort: just gone
        await wait_until(lambda: call.closed, 10, "the server to notice")
        took = time.monotonic() - gone
        assert call.close_reason == "caller vanished", call.close_reason
        assert 1.4 <= took <= 1.5 + 1.0, took    # the timeout from the last frame (it left before `gone`), + the watchdog period and close
        assert not s.signalling.calls and s.metrics.active_calls() == 0
        assert call.pc.connectionState == "closed" and call.reader is not None and call.reader.done()
        await caller.vanish()
        await asyncio.sleep(0.2)
        assert not live_pipeline_tasks(), live_pipeline_tasks()
