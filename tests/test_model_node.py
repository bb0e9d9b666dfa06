"""A media node and a model node, both in this process on 127.0.0.1 (slow: the real engines).

The model node is `build_app` with ``server.role = "model"`` over the real engines (the `engines`
fixture: Whisper tiny.en, the embedded SmolLM2, Piper), served on port 0.  The media node is a
conversation whose STT, LLM and TTS are the remote engines pointed at it (models/stt_openai.py,
models/llm_openai.py, models/tts_openai.py: what ``stt/llm/tts.engine = "openai"`` loads), with
the local VAD, driven by a scripted caller speaking a Piper-spoken question in real time.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from sub300.agent.engines import load_engines
from sub300.agent.events import TurnFailed, TurnFinished
from sub300.testing.scripted_caller import ScriptedCaller
from sub300.web.server import ADMISSION_KEY, build_app

from .speech import compose, speak

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@asynccontextmanager
async def model_node(config, engines, port: int = 0) -> AsyncIterator[tuple[web.Application, int]]:
    """A model node on 127.0.0.1:``port`` (0: any); yields its app and port."""
    config = copy.deepcopy(config)
    config.server.role = "model"
    app = build_app(config, engines)
    app.on_cleanup.clear()       # the session's engines outlive this node (the fixture owns them)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield app, runner.addresses[0][1]
    finally:
        await runner.cleanup()


def media_config(config, port: int):
    config = copy.deepcopy(config)
    config.server.role = "media"
    for section in (config.stt, config.llm, config.tts):
        section.engine = "openai"
        section.base_url = f"http://127.0.0.1:{port}/v1"
    return config


async def ask(caller: ScriptedCaller, question, turn: int):
    """Say ``question``; the turn's `TurnFinished` or `TurnFailed` once the agent is quiet again."""
    def outcome():
        return next((e for e in caller.events if isinstance(e, TurnFinished | TurnFailed) and e.turn == turn), None)
    await caller.say(question)
    await caller.wait_until(lambda: outcome() is not None, timeout=60)
    await caller.until_idle(timeout=30)
    return outcome()


async def test_a_media_node_answers_through_a_model_node_and_survives_its_drain_and_stop(config, engines, caplog):
    question = compose(0.3, speak("What is the capital of France?"), 0.1)
    async with model_node(config, engines) as (app, port):
        media = media_config(config, port)
        remote = load_engines(media, progress=lambda m: None)
        assert type(remote.stt).__name__ == "OpenAIRecognizer" and type(remote.tts).__name__ == "OpenAISynthesizer"
        caller = ScriptedCaller(remote, media)
        try:
            await caller.silence(0.3)
            answered = await ask(caller, question, 1)
            assert isinstance(answered, TurnFinished), answered
            assert "capital" in answered.transcript.lower() and answered.reply.strip()
            ledger = answered.ledger
            # every stage went over the wire: its network part apart from the model node's queue and work
            assert set(ledger.network_ms) >= {"stt", "llm", "tts"}, ledger.to_dict()
            assert all(ms >= 0 for ms in ledger.network_ms.values())
            assert set(ledger.queue_ms) >= {"stt", "llm", "tts"} and set(ledger.work_ms) >= {"stt", "llm", "tts"}
            assert ledger.work_ms["stt"] > 5 and ledger.work_ms["llm"] > 1   # Whisper's, the LLM's own work

            # the model node drains: new requests 503 + Retry-After; the media node's turn fails, the call goes on
            app[ADMISSION_KEY].drain()
            with caplog.at_level(logging.INFO):
                failed = await ask(caller, question, 2)
            assert isinstance(failed, TurnFailed) and failed.stage == "stt" and failed.failure == "http_5xx", failed
            assert "503" in failed.error
        except BaseException:
            await caller.close()
            raise

    # the model node stopped: refused connections; then a new one on the same port answers the same call
    try:
        failed = await ask(caller, question, 3)
        assert isinstance(failed, TurnFailed) and failed.stage == "stt" and failed.failure == "unreachable", failed
        async with model_node(config, engines, port):
            answered = await ask(caller, question, 4)
            assert isinstance(answered, TurnFinished) and answered.reply.strip(), answered
            assert set(answered.ledger.network_ms) >= {"stt", "llm", "tts"}
        assert not [r for r in caplog.records if r.exc_info], "a failure was logged with a traceback"
    finally:
        await caller.close()
        await remote.aclose()


async def test_an_llm_node_that_stops_mid_call_gets_the_spoken_fallback_from_the_audio_node(config, engines):
    """STT and TTS on one model node, the LLM on another (as with a vLLM box): the LLM node stops, the
    turn fails at the LLM and the caller hears the fallback line, synthesized by the audio node."""
    question = compose(0.3, speak("What is the capital of France?"), 0.1)
    async with model_node(config, engines) as (_, audio_port):
        media = media_config(config, audio_port)
        async with model_node(config, engines) as (_, llm_port):
            media.llm.base_url = f"http://127.0.0.1:{llm_port}/v1"
            remote = load_engines(media, progress=lambda m: None)
            caller = ScriptedCaller(remote, media)
            try:
                await caller.silence(0.3)
                answered = await ask(caller, question, 1)
                assert isinstance(answered, TurnFinished) and "llm" in answered.ledger.network_ms, answered
            except BaseException:
                await caller.close()
                await remote.aclose()
                raise
        try:
            heard_before = len(caller.agent_audio)
            failed = await ask(caller, question, 2)
            assert isinstance(failed, TurnFailed) and (failed.stage, failed.failure) == ("llm", "unreachable"), failed
            assert failed.reply == media.llm.fallback_text and failed.ledger.voice_to_voice_ms is not None
            assert len(caller.agent_audio) - heard_before > 10   # the fallback line was played (20 ms frames)
        finally:
            await caller.close()
            await remote.aclose()
