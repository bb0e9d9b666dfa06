"""/ws/twilio: a real WebSocket client replaying Twilio Media Streams' documented messages, on fake engines.

The client (`FakeTwilio`) plays the provider: it sends ``connected``, ``start``
and 20 ms ``media`` messages (μ-law), buffers the agent's audio and plays it
in real time, echoes each ``mark`` once the audio before it has played, and
on ``clear`` drops its buffer and echoes the marks still pending (Twilio's
documented behaviour).  Virtual time (looptime): each test takes milliseconds.
"""
from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestServer

from sub300.agent.auth.keys import new_key
from sub300.agent.auth.memory_store import MemoryKeyStore
from sub300.agent.auth.tokens import CallTokens
from sub300.agent.calls import ObserverGroup
from sub300.media.sip import g711
from sub300.testing.fakes import FakeLlm, FakeStt, FakeTts, fake_engines, speech
from sub300.web.auth import add_auth_routes
from sub300.web.server import SIGNALLING_KEY, build_app
from sub300.web.websocket import WS_CALLS_KEY

pytest.importorskip("looptime", reason="virtual time needs the test extra (looptime)")

SECRET = b"0123456789abcdef0123456789abcdef"
FRAME = 160   # 20 ms at 8 kHz


class Recorder:
    """A CallObserver keeping every call's transport, events and end reason."""

    def __init__(self) -> None:
        self.started: list[tuple[str, str]] = []
        self.events: list[object] = []
        self.ended: list[tuple[str, str, str]] = []

    def call_started(self, transport, call_id, context=None):
        self.started.append((transport, call_id))
        self.context = context
        return self.events.append

    def call_ended(self, transport, call_id, reason):
        self.ended.append((transport, call_id, reason))


class App:
    def __init__(self, config, engines, *, auth: bool = False, own_engines: bool = True) -> None:
        self.config = copy.deepcopy(config)
        self.app = build_app(self.config, engines)
        if not own_engines:
            self.app.on_cleanup.clear()   # the session's engines outlive this app (the fixture owns them)
        self.recorder = Recorder()
        signalling = self.app[SIGNALLING_KEY]
        signalling.observer = ObserverGroup([signalling.observer, self.recorder])
        self.tokens = None
        if auth:
            store = MemoryKeyStore()
            key, self.secret = new_key("caller", "calls")
            self.key_id = key.id
            store.add_key(key)
            self.tokens = CallTokens(SECRET, 300)
            add_auth_routes(self.app, self.config, store, enabled=True, tokens=self.tokens, environ={})
        self.server = TestServer(self.app, host="127.0.0.1")

    async def __aenter__(self) -> App:
        await self.server.start_server()
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()
        await self.server.close()

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))


def ulaw(pcm16k: np.ndarray) -> bytes:
    return g711.encode("PCMU", pcm16k[::2])


class FakeTwilio:
    """The provider's side of one stream (see the module docstring)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.buffer: list[object] = []        # np.ndarray of samples, or a mark name (str)
        self.played = np.zeros(0, np.int16)   # the agent's audio as the caller heard it
        self.received_samples = 0
        self.marks_sent: list[str] = []       # marks echoed back
        self.clears: list[int] = []           # samples played when each clear came
        self.messages: list[dict] = []
        self.closed: tuple[int | None, str] | None = None
        self.tasks = [asyncio.ensure_future(self._read()), asyncio.ensure_future(self._play())]

    async def send(self, payload: dict) -> None:
        await self.ws.send_str(json.dumps(payload))

    async def begin(self, params: dict | None = None) -> None:
        await self.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self.send({"event": "start", "sequenceNumber": "1", "streamSid": "MZ1",
                         "start": {"streamSid": "MZ1", "accountSid": "AC1", "callSid": "CA1",
                                   "tracks": ["inbound"], "customParameters": params or {},
                                   "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})

    async def speak(self, pcm16k: np.ndarray) -> None:
        """Send caller audio as 20 ms media messages, in real time."""
        data = ulaw(pcm16k)
        for i in range(0, len(data), FRAME):
            if self.ws.closed:
                return
            await self.send({"event": "media", "streamSid": "MZ1",
                             "media": {"track": "inbound", "chunk": str(i // FRAME + 1), "timestamp": str(i // 8),
                                       "payload": base64.b64encode(data[i:i + FRAME]).decode()}})
            await asyncio.sleep(0.02)

    async def _read(self) -> None:
        while True:
            msg = await self.ws.receive()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                self.closed = (self.ws.close_code, msg.extra if isinstance(msg.extra, str) else "")
                return
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            self.messages.append(data)
            if data["event"] == "media":
                assert data["streamSid"] == "MZ1"
                pcm = g711.decode("PCMU", base64.b64decode(data["media"]["payload"]))
                self.received_samples += len(pcm)
                self.buffer.append(pcm)
            elif data["event"] == "mark":
                self.buffer.append(data["mark"]["name"])
            elif data["event"] == "clear":
                self.clears.append(len(self.played))
                pending = [item for item in self.buffer if isinstance(item, str)]
                self.buffer.clear()
                for name in pending:
                    await self._echo(name)

    async def _echo(self, name: str) -> None:
        self.marks_sent.append(name)
        if not self.ws.closed:
            await self.send({"event": "mark", "streamSid": "MZ1", "mark": {"name": name}})

    async def _play(self) -> None:
        """Play 20 ms every 20 ms; a mark is echoed when the audio before it has played."""
        while True:
            await asyncio.sleep(0.02)
            while self.buffer and isinstance(self.buffer[0], str):
                await self._echo(self.buffer.pop(0))
            if self.buffer:
                self.played = np.concatenate([self.played, self.buffer.pop(0)])

    async def stop(self) -> None:
        await self.send({"event": "stop", "streamSid": "MZ1", "stop": {"accountSid": "AC1", "callSid": "CA1"}})

    async def finish(self) -> None:
        await asyncio.wait_for(self.tasks[0], 5)
        self.tasks[1].cancel()


def words(text: str) -> list[str]:
    return "".join(c if c.isalnum() else " " for c in text.lower()).split()


def events(recorder: Recorder, kind: str) -> list:
    return [e for e in recorder.events if getattr(e, "kind", None) == kind]


async def no_call_left(app: App) -> None:
    for _ in range(100):
        if not app.app[WS_CALLS_KEY].calls:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("a call was left")


@pytest.mark.looptime
async def test_a_question_gets_media_and_marks_and_the_ledger_hears_by_mark(config):
    engines = fake_engines(stt=FakeStt("What time is it?"), llm=FakeLlm(["It is noon."]),
                           tts=FakeTts(ms_per_piece=400))
    async with App(config, engines) as app:
        ws = await app.session.ws_connect(app.url("/ws/twilio"))
        twilio = FakeTwilio(ws)
        await twilio.begin()
        await twilio.speak(speech(0.6))
        await twilio.speak(np.zeros(16000 * 2, np.int16))
        await twilio.stop()
        await twilio.finish()
        await no_call_left(app)
        metrics = await (await app.session.get(app.url("/metrics"))).text()
    assert twilio.closed is not None and twilio.closed[0] == 1000
    assert app.recorder.started[0][0] == "twilio" and app.recorder.ended[0][2] == "stop"
    assert twilio.received_samples >= 0.4 * 8000 and np.abs(twilio.played).max() > 1000   # the agent's tone
    names = [m["mark"]["name"] for m in twilio.messages if m["event"] == "mark"]
    assert names and names == sorted(names, key=int)          # one mark per frame, in order
    finished, heard = events(app.recorder, "turn"), events(app.recorder, "turn_heard")
    assert len(finished) == 1 and len(heard) == 1
    ledger = heard[0].ledger
    assert ledger.notes["heard_by"] == "mark"
    # the provider plays a frame 20 ms after it arrives and echoes its mark then: ~20 ms on loopback
    assert 0 <= ledger.transport_ms["playout"] <= 60
    assert ledger.marks["first_audio_heard"] > ledger.marks["first_audio_out"]
    assert 'sub300_calls_total{transport="twilio"} 1.0' in metrics
    usage = events(app.recorder, "call_usage")   # usage metering: what the call consumed after its last turn
    assert len(usage) == 1 and ledger.usage["agent_audio_s"] > 0


def heard_words(pieces: list[str], piece_samples: int, played: int) -> int:
    """Words of a reply heard after ``played`` samples: whole pieces, then the played share (agent/reply.py)."""
    count = 0
    for piece in pieces:
        words = len(piece.split())
        if played >= piece_samples:
            count, played = count + words, played - piece_samples
        else:
            return count + int(words * played / piece_samples)
    return count


@pytest.mark.looptime
async def test_barge_in_sends_clear_and_the_history_keeps_only_what_the_marks_confirmed(config):
    story = "Once upon a time " + " ".join(f"there were {i} bears in a wood near the river." for i in range(8))
    llm = FakeLlm(lambda messages: [story] if len(messages) <= 2 else ["Sure."])
    tts = FakeTts(ms_per_piece=500)
    engines = fake_engines(stt=FakeStt("Tell me a long story please"), llm=llm, tts=tts)
    async with App(config, engines) as app:
        ws = await app.session.ws_connect(app.url("/ws/twilio"))
        twilio = FakeTwilio(ws)
        await twilio.begin()
        await twilio.speak(speech(0.6))
        await twilio.speak(np.zeros(int(16000 * 1.2), np.int16))   # the agent talks for ~0.7 s of it
        await twilio.speak(speech(0.8, seed=1))                     # the caller barges in
        await twilio.speak(np.zeros(16000 * 1, np.int16))
        await twilio.stop()
        await twilio.finish()
        await no_call_left(app)
    assert twilio.clears, "no clear on barge-in"
    played_at_clear = twilio.clears[0]
    sent_before_clear = 0
    for message in twilio.messages:
        if message["event"] == "clear":
            break
        if message["event"] == "media":
            sent_before_clear += FRAME
    assert sent_before_clear >= played_at_clear + 4 * FRAME    # audio was sent ahead of the ear (100 ms)
    heard = [m for m in llm.requests[-1] if m["role"] == "assistant"][0]["content"]
    pieces, piece_samples = tts.pieces[:8], 500 * 8
    played_words = heard_words(pieces, piece_samples, played_at_clear)
    assert played_words < heard_words(pieces, piece_samples, sent_before_clear)   # the test can tell them apart
    # what the marks confirmed: at most what the provider played, at least that less the frames in flight
    assert heard_words(pieces, piece_samples, played_at_clear - 3 * FRAME) <= len(heard.split()) <= played_words
    assert heard and story.startswith(heard.rstrip(".").rsplit(" ", 1)[0])


@pytest.mark.looptime
async def test_a_client_vanishing_mid_call_ends_it_cleanly(config):
    async with App(config, fake_engines(tts=FakeTts(ms_per_piece=3000))) as app:
        ws = await app.session.ws_connect(app.url("/ws/twilio"))
        twilio = FakeTwilio(ws)
        await twilio.begin()
        await twilio.speak(speech(0.6))
        await twilio.speak(np.zeros(16000, np.int16))   # the agent is speaking
        tasks_before = len(asyncio.all_tasks())
        ws._response.connection.transport.abort()      # no close frame: the TCP connection is cut
        for task in twilio.tasks:
            task.cancel()
        await no_call_left(app)
        assert app.recorder.ended and app.recorder.ended[0][2] in ("connection lost", "caller closed")
        await asyncio.sleep(0.1)
        assert len(asyncio.all_tasks()) < tasks_before   # the call's clock, writer and turn tasks are gone
        calls = [t for t in asyncio.all_tasks() if "twilio-" in t.get_name() or "conversation" in t.get_name()]
        assert not calls


@pytest.mark.looptime
async def test_malformed_messages_are_logged_and_the_call_goes_on(config, caplog):
    engines = fake_engines(stt=FakeStt("Hello?"), llm=FakeLlm(["Hi."]), tts=FakeTts(ms_per_piece=200))
    async with App(config, engines) as app:
        ws = await app.session.ws_connect(app.url("/ws/twilio"))
        twilio = FakeTwilio(ws)
        await ws.send_str(json.dumps({"event": "media", "media": {"payload": "AAAA"}}))   # before start
        await twilio.begin()
        with caplog.at_level(logging.INFO):
            for bad in ("not json", "[1, 2]", json.dumps({"event": "nonsense"}),
                        json.dumps({"event": "media", "media": {"payload": "!!not base64!!"}}),
                        json.dumps({"event": "media", "media": {"payload": ""}}),
                        json.dumps({"event": "media", "media": {"payload": "A" * 20000}}),
                        json.dumps({"event": "dtmf", "dtmf": {"digit": "x"}}),
                        json.dumps({"event": "mark", "mark": {"name": "not ours"}})):
                await ws.send_str(bad)
            await ws.send_bytes(b"\x00\x01")
            await twilio.speak(speech(0.4))
            await twilio.speak(np.zeros(int(16000 * 0.7), np.int16))
            await twilio.stop()
            await twilio.finish()
        await no_call_left(app)
    assert events(app.recorder, "turn"), "the call did not go on after bad messages"
    text = caplog.text
    assert "media message before start was ignored" in text
    for what in ("not JSON", "must be a JSON object", "unknown event 'nonsense'", "not valid base64",
                 "non-empty base64", "longer than", "dtmf.digit", "a mark we did not send", "BINARY"):
        assert what in text, what
    assert app.recorder.ended[0][2] == "stop"


@pytest.mark.looptime
async def test_no_start_and_a_bad_media_format_are_refused(config):
    async with App(config, fake_engines()) as app:
        ws = await app.session.ws_connect(app.url("/ws/twilio"))
        await ws.send_str(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        msg = await ws.receive(timeout=30)
        assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1008 and "no start event" in msg.extra
        ws = await app.session.ws_connect(app.url("/ws/twilio"))
        await ws.send_str(json.dumps({"event": "start", "start": {
            "streamSid": "MZ2", "mediaFormat": {"encoding": "audio/l16", "sampleRate": 16000, "channels": 1}}}))
        msg = await ws.receive(timeout=30)
        assert ws.close_code == 1008 and "mediaFormat" in msg.extra
        assert (await app.session.get(app.url("/healthz"))).status == 200   # the server stays up
    assert not app.recorder.started   # refused before any call


async def closed_after_start(app: App, params: dict | None = None, path: str = "/ws/twilio") -> tuple:
    twilio = FakeTwilio(await app.session.ws_connect(app.url(path)))
    await twilio.begin(params)
    await twilio.finish()
    assert twilio.closed is not None
    return twilio.closed


@pytest.mark.looptime
async def test_auth_a_token_in_the_query_or_in_custom_parameters_wrong_ones_refused(config):
    async with App(config, fake_engines(), auth=True) as app:
        token = app.tokens.mint(app.key_id).token
        # no credential on the upgrade is allowed (Twilio cannot send one): the start event must carry it
        code, reason = await closed_after_start(app)
        assert code == 1008 and "authentication required" in reason
        code, reason = await closed_after_start(app, {"token": "x.y.z"})
        assert code == 1008 and "invalid call token" in reason
        code, reason = await closed_after_start(app, {"token": app.secret})   # an API key: never in parameters
        assert code == 1008 and "only a call token" in reason
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:   # a bad token in the URL: 401, no upgrade
            await app.session.ws_connect(app.url("/ws/twilio?token=x.y.z"))
        assert refused.value.status == 401
        with pytest.raises(aiohttp.WSServerHandshakeError):   # /ws/pcm has no deferred authentication
            await app.session.ws_connect(app.url("/ws/pcm"))
        assert not app.recorder.started
        for params, path in (({"token": token}, "/ws/twilio"), ({}, f"/ws/twilio?token={token}")):
            twilio = FakeTwilio(await app.session.ws_connect(app.url(path)))
            await twilio.begin(params)
            await twilio.speak(np.zeros(1600, np.int16))
            await twilio.stop()
            await twilio.finish()
            assert app.recorder.context.key_id == app.key_id
        await no_call_left(app)
    assert [t for t, _ in app.recorder.started] == ["twilio", "twilio"]


@pytest.mark.looptime
async def test_drain_says_goodbye_and_closes_call_limits_hang_up_admission_refuses(config):
    from sub300.drain import Drain
    from sub300.web.server import ADMISSION_KEY

    engines = fake_engines(stt=FakeStt("Hello?"), llm=FakeLlm(["Hi."]), tts=FakeTts(ms_per_piece=300))
    async with App(config, engines) as app:
        twilio = FakeTwilio(await app.session.ws_connect(app.url("/ws/twilio")))
        await twilio.begin()
        talk = asyncio.ensure_future(twilio.speak(np.zeros(16000 * 20, np.int16)))   # a line with silence on it
        await asyncio.sleep(0.5)
        drain = Drain(app.app[ADMISSION_KEY], timeout_s=5, goodbye="We are closing, goodbye.")
        drain.calls.append(app.app[WS_CALLS_KEY])
        assert drain.active_calls() == 1
        assert await drain.drain() == "drained"
        await twilio.finish()
        talk.cancel()
        assert twilio.closed == (1001, "agent_hangup: drain")
        assert np.abs(twilio.played).max() > 1000          # the goodbye was played before the socket closed
        assert app.recorder.ended[-1][2] == "agent_hangup: drain"
        refused = FakeTwilio(await app.session.ws_connect(app.url("/ws/twilio")))
        await refused.begin()
        await refused.finish()
        assert refused.closed is not None and refused.closed[0] == 1013 and "draining" in refused.closed[1]
        await no_call_left(app)
    async with App(config, engines) as app:   # a forced drain ends the calls left at once
        twilio = FakeTwilio(await app.session.ws_connect(app.url("/ws/twilio")))
        await twilio.begin()
        talk = asyncio.ensure_future(twilio.speak(np.zeros(16000 * 20, np.int16)))
        await asyncio.sleep(0.3)
        await app.app[WS_CALLS_KEY].end_now("drain forced")
        await twilio.finish()
        talk.cancel()
        assert twilio.closed == (1001, "server shutting down") and app.recorder.ended[-1][2] == "drain forced"
        assert not app.app[WS_CALLS_KEY].calls
    config = copy.deepcopy(config)
    config.call.inactivity_timeout_s = 2.0
    async with App(config, engines) as app:
        twilio = FakeTwilio(await app.session.ws_connect(app.url("/ws/twilio")))
        await twilio.begin()
        talk = asyncio.ensure_future(twilio.speak(np.zeros(16000 * 20, np.int16)))
        await twilio.finish()
        talk.cancel()
        assert twilio.closed == (1000, "agent_hangup: inactivity")
        await no_call_left(app)


def test_heard_playout_takes_back_unconfirmed_frames_across_segments():
    from sub300.media.websocket.heard import HeardPlayout

    unsent: list[int] = []
    playout = HeardPlayout(8000, lambda: 0.0, on_unsent=unsent.append)
    playout.push(np.arange(1, 201, dtype=np.int16), turn=1, piece=0)
    playout.push(np.arange(201, 401, dtype=np.int16), turn=1, piece=1)
    frames = [playout.pull(160) for _ in range(2)]            # 320 samples sent: all of piece 0, 120 of piece 1
    assert frames[1] is not None and frames[1][0] == 161
    assert playout.confirm(1) == [1]                          # frame 1 played: turn 1's first frame heard
    assert playout.played_fraction(1, 0) == 1.0 and playout.played_fraction(1, 1) == 0.6
    playout.pause()                                           # barge-in: frame 2 was not confirmed
    assert unsent == [160] and playout.played_total == 160
    assert playout.played_fraction(1, 0) == 0.8 and playout.played_fraction(1, 1) == 0.0
    assert playout.confirm(2) == []                           # its mark, echoed after the clear, changes nothing
    playout.resume(rewind=False)
    again = playout.pull(160)
    assert again is not None and again[0] == 161               # the caller hears what was cleared
    playout.flush()
    assert unsent == [160, 160] and playout.idle


@pytest.mark.slow
async def test_a_spoken_question_over_twilio_gets_a_spoken_answer(config, engines):
    """Real engines, real time: Piper's question as μ-law media, the agent's answer transcribed back."""
    from sub300.agent.audio import int16_to_float32, resample

    from .speech import silence, speak

    async with App(config, engines, own_engines=False) as app:
        twilio = FakeTwilio(await app.session.ws_connect(app.url("/ws/twilio")))
        await twilio.begin()
        await twilio.speak(np.concatenate([silence(0.3), speak("What is the capital of France?")]))
        for _ in range(300):   # up to 15 s of silence: the answer plays meanwhile
            if events(app.recorder, "turn") and not twilio.buffer and len(twilio.played) > 8000:
                break
            await twilio.speak(silence(0.05))
        await asyncio.sleep(0.5)
        await twilio.stop()
        await twilio.finish()
        await no_call_left(app)
    turns = events(app.recorder, "turn")
    assert turns, "no answered turn"
    assert "france" in turns[0].transcript.lower() or "capital" in turns[0].transcript.lower()
    heard = events(app.recorder, "turn_heard")
    assert heard and heard[0].ledger.notes["heard_by"] == "mark"
    answer = await asyncio.to_thread(engines.stt.transcribe, int16_to_float32(resample(twilio.played, 8000, 16000)))
    # the reply's words, as the caller heard them over μ-law (tiny.en: allow a word or two to differ)
    said, understood = set(words(turns[0].reply)), set(words(answer.text))
    assert understood and len(said & understood) >= len(said) // 2, (turns[0].reply, answer.text)
