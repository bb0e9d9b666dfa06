"""`kill -9` during a call loses at most the turn in flight: `sub300 serve` with records on a tmp SQLite,
a real WebRTC call (aiortc) with several turns, SIGKILL once two turns are in the database, then the
database opens, holds those turns and their usage, and the call has no end.  And with SIGTERM instead,
the drain ends the call and every record is written: its end, its cause and the usage after its last
turn (slow)."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest
from sqlalchemy import create_engine, text

from sub300.agent.config import load_config
from sub300.agent.records import open_store
from sub300.testing.aiortc_caller import AiortcCaller

from .browser_calls import start_server, wait_healthy
from .server_process import free_port
from .speech import compose, speak

pytestmark = pytest.mark.slow


def turns_in(db_url: str) -> int:
    engine = create_engine(db_url)
    try:
        with engine.connect() as c:
            return int(c.execute(text("SELECT count(*) FROM turns")).scalar() or 0)
    except Exception:   # not created yet (the server migrates at start)
        return 0
    finally:
        engine.dispose()


async def call_until_two_turns(tmp_path, stop: signal.Signals) -> tuple[str, int, str]:
    """A call with four questions queued; ``stop`` is sent once two turns are in the database.
    Returns the database URL, the server's exit status and the call id."""
    db_url = f"sqlite:///{tmp_path / 'records.db'}"
    port = free_port()
    questions = [compose(0.8, speak(q), 1.5) for q in
                 ("What is the capital of France?", "How many legs does a spider have?",
                  "What colour is the sky?", "Name a large animal.")]
    server = start_server(port, tmp_path / "server.log", [f"SUB300_RECORDS_URL={db_url}",
                                                           "SUB300_SERVER_DRAIN_TIMEOUT_S=20"])
    base = f"http://127.0.0.1:{port}"
    try:
        await asyncio.to_thread(wait_healthy, base, server, 120)
        async with aiohttp.ClientSession() as session:
            caller = AiortcCaller(base, session)
            await caller.connect()
            assert caller.call_id is not None
            call_id = caller.call_id
            for question in questions:
                caller.say(question)
            deadline = time.monotonic() + 180
            while turns_in(db_url) < 2:
                assert time.monotonic() < deadline, "two turns were never written"
                assert server.poll() is None, f"server exited: {(tmp_path / 'server.log').read_text()[-3000:]}"
                await asyncio.sleep(0.1)
            os.kill(server.pid, stop)
            returncode = await asyncio.to_thread(server.wait, 60)
            if caller.pc is not None:
                await caller.pc.close()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
    return db_url, returncode, call_id


def export(db_url: str, call_id: str) -> dict:
    store = open_store(load_config(environ={"SUB300_RECORDS_URL": db_url}))   # opens (WAL replayed), migrates
    try:
        return store.export_call(call_id)
    finally:
        store.close()


def check_turns(doc: dict, call_id: str) -> list[dict]:
    answered = [t for t in doc["turns"] if t["outcome"] == "answered"]
    assert len(doc["turns"]) >= 2 and answered, doc["turns"]
    assert all(t["transcript"] and t["reply"] and t["ledger"] for t in answered)
    turn_events = {u["event_id"]: u for u in doc["usage"]}
    for t in answered:   # each answered turn's usage was committed with it
        event = turn_events.get(f"{call_id}/turn/{t['turn']}")
        assert event is not None, f"turn {t['turn']} has no usage event: {sorted(turn_events)}"
        assert event["caller_audio_s"] > 0 and event["llm_completion_tokens"] > 0 and event["tts_chars"] > 0
    return answered


async def test_kill_9_keeps_every_committed_turn(tmp_path):
    db_url, returncode, call_id = await call_until_two_turns(tmp_path, signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    doc = export(db_url, call_id)
    check_turns(doc, call_id)
    assert doc["call"]["ended_at"] is None and doc["call"]["hangup_cause"] is None   # killed: no end written


async def test_sigterm_drain_writes_the_end_and_the_last_usage(tmp_path):
    db_url, returncode, call_id = await call_until_two_turns(tmp_path, signal.SIGTERM)
    assert returncode == 0, (tmp_path / "server.log").read_text()[-3000:]
    doc = export(db_url, call_id)
    check_turns(doc, call_id)
    assert doc["call"]["ended_at"] is not None and doc["call"]["hangup_cause"], doc["call"]
    assert f"{call_id}/end" in {u["event_id"] for u in doc["usage"]}   # the caller's audio after the last turn
