"""Records (agent/records): the store on SQLite (fast) and on a real PostgreSQL (slow), the observer's
writer, redaction, the CLI and the admin routes."""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from sub300.agent.auth.keys import ApiKey
from sub300.agent.calls import CallContext
from sub300.agent.config import load_config
from sub300.agent.events import TurnDiscarded, TurnFailed, TurnFinished, TurnHeard
from sub300.agent.ledger import TurnLedger
from sub300.agent.records import RecordsObserver, RecordStore, UnknownCall, open_store
from sub300.agent.records.redaction import RedactingFilter, luhn_valid, redact
from sub300.agent.records.schema import metadata
from sub300.agent.records.store import make_engine, upgrade
from sub300.agent.records.times import parse_time

from .postgres import postgres_url  # noqa: F401  (fixture)

DAY = 86_400.0
T0 = 1_795_000_000.0    # 2026-11-18 11:06:40 UTC, a fixed epoch for reproducible periods


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    """One migrated SQLite file, copied for each test (migrating each time would cost ~0.1 s a test)."""
    path = tmp_path_factory.mktemp("records-template") / "records.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def store(request, tmp_path, sqlite_template):
    if request.param == "sqlite":
        path = tmp_path / "records.db"
        shutil.copy(sqlite_template, path)
        s = RecordStore(make_engine(f"sqlite:///{path}"), tmp_path / "recordings")
    else:
        url = request.getfixturevalue("postgres_url")
        engine = make_engine(url)
        upgrade(engine)
        with engine.begin() as c:
            c.execute(text("TRUNCATE api_keys, calls, turns, usage_events, audit_log"))
        s = RecordStore(engine, tmp_path / "recordings")
    yield s
    s.close()


def records_config(tmp_path, **records):
    env = {"SUB300_RECORDS_URL": f"sqlite:///{tmp_path / 'r.db'}"}
    env.update({f"SUB300_RECORDS_{k.upper()}": str(v) for k, v in records.items()})
    return load_config(environ=env)


# ---------------------------------------------------------------- schema and migrations
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def test_migrations_from_empty_give_exactly_the_schema(backend, tmp_path, request):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    url = f"sqlite:///{tmp_path / 'empty.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    engine = make_engine(url)
    if backend == "postgresql":
        with engine.begin() as c:
            c.execute(text("DROP TABLE IF EXISTS api_keys, calls, turns, usage_events, audit_log, alembic_version"))
    assert upgrade(engine) == "0001"
    assert upgrade(engine) == "0001"          # a second run is a no-op
    with engine.connect() as c:
        assert compare_metadata(MigrationContext.configure(c), metadata) == []
        if backend == "sqlite":
            assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    engine.dispose()


def test_default_url_is_in_the_xdg_state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    store = open_store(load_config(environ={}))
    try:
        assert store.url == f"sqlite:///{tmp_path / 'state' / 'sub300' / 'records.db'}"
        assert store.recordings_dir == tmp_path / "state" / "sub300" / "recordings"
        assert (tmp_path / "state" / "sub300" / "records.db").exists()
    finally:
        store.close()


# ---------------------------------------------------------------- the store
def test_usage_events_are_idempotent(store):
    assert store.add_usage("c1/end", "call_end", T0, {"caller_audio_s": 2.0}, "k1", "c1") is True
    assert store.add_usage("c1/end", "call_end", T0, {"caller_audio_s": 2.0}, "k1", "c1") is False
    store.call_started("c1", "webrtc", T0, "k1")
    store.add_turn("c1", 1, T0, "answered", "hi", "hello", {}, usage={"tts_chars": 5}, key_id="k1")
    with pytest.raises(KeyError, match="bogus"):
        store.add_usage("c2/end", "call_end", T0, {"bogus": 1.0}, "k1", "c2")
    assert store.add_usage("c1/turn/1", "turn", T0, {"tts_chars": 5}, "k1", "c1") is False
    [row] = store.usage()
    assert (row["caller_audio_s"], row["tts_chars"], row["events"], row["calls"]) == (2.0, 5, 2, 1)


def test_usage_totals_per_key_day_and_month(store):
    store.add_usage("a/turn/1", "turn", T0, {"llm_prompt_tokens": 10, "caller_audio_s": 1.25}, "k1", "a")
    store.add_usage("a/end", "call_end", T0 + 60, {"caller_audio_s": 0.5}, "k1", "a")
    store.add_usage("b/turn/1", "turn", T0 + DAY, {"llm_prompt_tokens": 7}, "k1", "b")
    store.add_usage("model/x", "model", T0 + DAY, {"llm_prompt_tokens": 3, "llm_completion_tokens": 4}, "k2")
    store.add_usage("c/turn/1", "turn", T0 + 20 * DAY, {"tts_chars": 9}, None, "c")
    total = {r["key_id"]: r for r in store.usage()}
    assert total["k1"]["calls"] == 2 and total["k1"]["llm_prompt_tokens"] == 17
    assert total["k1"]["caller_audio_s"] == 1.75 and total["k1"]["requests"] == 0
    assert total["k2"]["requests"] == 1 and total["k2"]["calls"] == 0
    assert total[None]["tts_chars"] == 9
    days = [(r["period"], r["key_id"], r["calls"]) for r in store.usage(period="day")]
    assert days == [("2026-11-18", "k1", 1), ("2026-11-19", "k1", 1), ("2026-11-19", "k2", 0),
                    ("2026-12-08", None, 1)]
    months = [(r["period"], r["key_id"]) for r in store.usage(period="month")]
    assert months == [("2026-11", "k1"), ("2026-11", "k2"), ("2026-12", None)]
    assert [r["key_id"] for r in store.usage(since=T0 + DAY, until=T0 + 2 * DAY)] == ["k1", "k2"]
    json.dumps(store.usage(period="day"))


def test_export_forget_and_audit(store, tmp_path):
    recording = tmp_path / "c1.wav"
    recording.write_bytes(b"RIFF")
    store.call_started("c1", "sip", T0, "k1", "192.0.2.7", record_audio=True)
    store.set_recording("c1", str(recording))
    store.add_turn("c1", 1, T0 + 1, "answered", "my name is Ann", "hello Ann", {"voice_to_voice_ms": 250.0},
                   usage={"caller_audio_s": 1.0}, key_id="k1")
    store.add_turn("c1", 2, T0 + 2, "discarded", error="no words in the transcript")
    store.call_ended("c1", T0 + 3, "caller hung up")
    doc = store.export_call("c1")
    assert doc["call"]["source"] == "192.0.2.7" and doc["call"]["hangup_cause"] == "caller hung up"
    assert [t["transcript"] for t in doc["turns"]] == ["my name is Ann", None]
    assert doc["turns"][0]["ledger"] == {"voice_to_voice_ms": 250.0}
    assert doc["usage"][0]["event_id"] == "c1/turn/1" and doc["recording"] == str(recording)
    json.dumps(doc)

    result = store.forget_call("c1", actor="ops@example")
    assert result["turns_erased"] == 2 and result["recording_deleted"] and not recording.exists()
    after = store.export_call("c1")
    assert after["turns"] == [] and after["call"]["source"] is None and after["recording"] is None
    assert after["call"]["forgotten_at"] is not None and after["call"]["ended_at"] == T0 + 3
    assert after["usage"][0]["caller_audio_s"] == 1.0          # billing keeps its quantities
    again = store.forget_call("c1", actor="ops@example")
    assert again["turns_erased"] == 0 and "already forgotten" in again["detail"]
    assert [(a["action"], a["actor"]) for a in store.audit("c1")] == [("forget", "ops@example")] * 2
    with pytest.raises(UnknownCall, match="no call 'nope'"):
        store.forget_call("nope")
    with pytest.raises(UnknownCall):
        store.export_call("nope")


def test_retention_removes_old_text_and_recordings_keeps_usage(store, tmp_path):
    old_wav, new_wav = tmp_path / "old.wav", tmp_path / "new.wav"
    for path in (old_wav, new_wav):
        path.write_bytes(b"RIFF")
    store.call_started("old", "webrtc", T0, record_audio=True)
    store.set_recording("old", str(old_wav))
    store.add_turn("old", 1, T0, "answered", "old words", "old reply", {"x": 1}, usage={"tts_chars": 9})
    store.call_started("new", "webrtc", T0 + 10 * DAY, record_audio=True)
    store.set_recording("new", str(new_wav))
    store.add_turn("new", 1, T0 + 10 * DAY, "answered", "new words", "new reply", {"x": 1})
    assert store.purge(T0 + 5 * DAY) == {"turns": 1, "recordings": 1}
    assert store.purge(T0 + 5 * DAY) == {"turns": 0, "recordings": 0}
    old = store.export_call("old")
    assert old["turns"][0]["transcript"] is None and old["turns"][0]["ledger"] is None
    assert old["turns"][0]["outcome"] == "answered" and old["recording"] is None and not old_wav.exists()
    assert old["usage"][0]["tts_chars"] == 9
    assert store.export_call("new")["turns"][0]["transcript"] == "new words" and new_wav.exists()
    assert [a["action"] for a in store.audit()] == ["purge"]


def test_keystore(store):
    key = ApiKey("k1", "billing", frozenset({"usage", "admin"}), "ab" * 32, T0)
    store.add_key(key)
    assert store.key_by_id("k1") == key and store.key_by_hash("ab" * 32) == key
    assert store.key_by_id("k2") is None
    assert store.revoke_key("k1", T0 + 1) is True and store.revoke_key("k1", T0 + 2) is False
    assert store.list_keys()[0].revoked_at == T0 + 1


# ---------------------------------------------------------------- the observer
def ledger(turn: int, **usage: float) -> TurnLedger:
    out = TurnLedger(turn)
    out.usage.update(usage)
    return out


async def test_observer_commits_each_turn_as_it_comes(tmp_path):
    config = records_config(tmp_path)
    store = open_store(config)
    clock = iter(T0 + i for i in range(100))
    observer = RecordsObserver(store, config, clock=lambda: next(clock), purge_interval_s=None)
    listen = observer.call_started("webrtc", "c1", CallContext("k1", "198.51.100.2"))
    listen(TurnFinished(1, "my card is 4111 1111 1111 1111", "noted", ledger(1, caller_audio_s=2.5, tts_chars=5)))
    await observer.aflush()
    reader = create_engine(f"sqlite:///{tmp_path / 'r.db'}")   # another connection sees the committed turn
    with reader.connect() as c:
        assert c.execute(text("SELECT transcript FROM turns")).scalar() == "my card is [card]"
    failed = ledger(2, stt_audio_s=1.0)
    failed.notes["unspoken"] = "mail me at ann@example.com"
    listen(TurnFailed(2, "LLM endpoint: dropped", "llm", "dropped", "hello", "sorry", failed))
    listen(TurnDiscarded(3, "no words in the transcript"))
    listen(TurnHeard(1, ledger(1)))
    listen(type("CallUsage", (), {"kind": "call_usage", "usage": {"caller_audio_s": 0.5}})())
    observer.call_ended("webrtc", "c1", "caller hung up")
    await observer.aclose()
    doc = store.export_call("c1")
    assert [(t["turn"], t["outcome"]) for t in doc["turns"]] == [(1, "answered"), (2, "failed"), (3, "discarded")]
    assert doc["turns"][1]["stage"] == "llm" and doc["call"]["hangup_cause"] == "caller hung up"
    assert doc["turns"][1]["ledger"]["notes"]["unspoken"] == "mail me at [email]"
    assert doc["call"]["key_id"] == "k1" and doc["call"]["ended_at"] is not None
    assert sorted(u["event_id"] for u in doc["usage"]) == ["c1/end", "c1/turn/1", "c1/turn/2"]
    [row] = store.usage()
    assert row["key_id"] == "k1" and row["caller_audio_s"] == 3.0 and row["stt_audio_s"] == 1.0
    observer.model_request("k2", "127.0.0.1", "/v1/chat/completions", {"llm_prompt_tokens": 4}, 200)
    assert observer.lost == 1                                # closed: counted lost, never raised
    reader.dispose()
    store.close()


async def test_a_failing_database_never_breaks_the_call(tmp_path, caplog):
    class Broken:
        def __getattr__(self, name):
            def fail(*args):
                raise OSError("disk full")
            return fail

    lost: list[int] = []
    observer = RecordsObserver(Broken(), records_config(tmp_path), purge_interval_s=None)  # type: ignore[arg-type]
    observer.on_lost.append(lost.append)
    listen = observer.call_started("sip", "c1")
    listen(TurnFinished(1, "hi", "hello", ledger(1)))
    observer.model_request(None, None, "/v1/chat/completions", {"llm_completion_tokens": 3}, 200)
    observer.call_ended("sip", "c1", "bye")
    await observer.aclose()
    assert observer.lost == 4 and lost == [1, 1, 1, 1] and observer.written == 0
    assert "disk full" in caplog.text and "4 records lost so far" in caplog.text


def test_observer_runs_retention_in_its_writer(tmp_path):
    config = records_config(tmp_path, retention_days=1)
    store = open_store(config)
    store.call_started("c", "webrtc", T0)
    store.add_turn("c", 1, T0, "answered", "old", "old")
    observer = RecordsObserver(store, config, clock=lambda: T0 + 2 * DAY, purge_interval_s=3600)
    observer.flush()
    observer.close()
    assert store.export_call("c")["turns"][0]["transcript"] is None
    store.close()


# ---------------------------------------------------------------- redaction
@pytest.mark.parametrize("said, stored", [
    ("my card is 4111 1111 1111 1111 thanks", "my card is [card] thanks"),
    ("4111-1111-1111-1111", "[card]"),
    ("four one one one one one one one one one one one one one one one", "[card]"),
    ("call me at (415) 555-0123.", "call me at [phone]."),
    ("+14155550123", "[phone]"),
    ("my number is five five five, one two three four.", "my number is [phone]."),
    ("double five five one two three four", "[phone]"),
    ("write to john.doe@example.com now", "write to [email] now"),
    ("it is john at example dot com", "it is [email]"),
    # not caught, on purpose or by limit
    ("it costs 1,000,000 dollars", "it costs 1,000,000 dollars"),
    ("in 2019 we had 3 cats", "in 2019 we had 3 cats"),
    ("order 1234 5678 9012 3456", "order 1234 5678 9012 3456"),     # 16 digits failing Luhn: not a card
    ("oh I see, one two three", "oh I see, one two three"),
    ("four hundred fifteen five five five", "four hundred fifteen five five five"),
    ("meet me at the park", "meet me at the park"),
])
def test_redaction(said, stored):
    assert redact(said) == stored


def test_redaction_kinds_and_luhn():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert redact("4111 1111 1111 1111 or a@b.io", ["email"]) == "4111 1111 1111 1111 or [email]"
    assert redact("4111 1111 1111 1111", ["phone"]) == "4111 1111 1111 1111"   # 16 digits: never a phone
    assert redact("4111 1111 1111 1111", []) == "4111 1111 1111 1111"


def test_redacting_filter_masks_log_lines(caplog):
    logger = logging.getLogger("test_records.redaction")
    f = RedactingFilter(["phone", "email"])
    logger.addFilter(f)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            logger.info("caller said %r", "ring 415 555 0123 or mail a@b.io")
    finally:
        logger.removeFilter(f)
    assert caplog.records[0].getMessage() == "caller said 'ring [phone] or mail [email]'"


def test_the_access_log_keeps_its_status_and_size_but_not_an_email():
    f = RedactingFilter(["card", "phone", "email"])
    line = '127.0.0.1 [30/Nov/2026:03:49:18 +0000] "POST /offer?mail=a@b.io HTTP/1.1" 200 2521 "-" "curl/8.5.0"'
    access = logging.LogRecord("aiohttp.access", logging.INFO, __file__, 1, line, (), None)
    assert f.filter(access) and access.getMessage() == line.replace("a@b.io", "[email]")
    other = logging.LogRecord("sub300.web", logging.INFO, __file__, 1, "status 200 2521", (), None)
    assert f.filter(other) and other.getMessage() == "status [phone]"    # elsewhere the same digits are masked


# ---------------------------------------------------------------- CLI and admin routes
def test_parse_time():
    assert parse_time("-7d", now=T0) == T0 - 7 * DAY and parse_time("-12h", now=T0) == T0 - 43_200
    assert parse_time("2026-11-17") == 1_794_873_600.0 and parse_time("1795000000") == T0
    assert parse_time("2026-11-17T01:00:00+01:00") == 1_794_873_600.0 and parse_time(None) is None
    with pytest.raises(Exception, match="is not a time"):
        parse_time("last week")


def test_cli_usage_export_forget(tmp_path, monkeypatch, capsys, root_logging):
    from sub300.cli import main

    monkeypatch.setenv("SUB300_RECORDS_URL", f"sqlite:///{tmp_path / 'r.db'}")
    store = open_store(load_config(environ={"SUB300_RECORDS_URL": f"sqlite:///{tmp_path / 'r.db'}"}))
    now = time.time()
    store.call_started("c1", "webrtc", now, "k1")
    store.add_turn("c1", 1, now, "answered", "hi", "hello", {}, usage={"caller_audio_s": 1.5}, key_id="k1")
    store.close()
    assert main(["usage", "--since", "-7d", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["usage"][0]["calls"] == 1 and doc["usage"][0]["caller_audio_s"] == 1.5
    assert main(["usage", "--key", "nobody", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"since": None, "until": None, "period": None, "key_id": "nobody",
                                                   "usage": []}
    assert main(["usage", "--period", "day"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["period", "key_id", "calls"] and table[1].split()[1:3] == ["k1", "1"]
    assert main(["export", "c1"]) == 0 and json.loads(capsys.readouterr().out)["turns"][0]["transcript"] == "hi"
    assert main(["forget", "c1", "--actor", "dpo"]) == 0 and "1 turns erased" in capsys.readouterr().out
    assert main(["forget", "nope"]) == 1 and "no call 'nope'" in capsys.readouterr().err
    assert main(["records", "purge"]) == 0 and main(["db", "upgrade"]) == 0


async def test_admin_routes(store):
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from sub300.web.admin import add_admin_routes

    store.call_started("c1", "webrtc", T0, "k1")
    store.add_turn("c1", 1, T0, "answered", "hi", "hello", {}, usage={"tts_chars": 5}, key_id="k1")
    app = web.Application()
    add_admin_routes(app, store)
    async with TestClient(TestServer(app)) as client:
        r = await client.get("/v1/usage", params={"since": "1795000000", "period": "month"})
        assert r.status == 200 and (await r.json())["usage"][0]["tts_chars"] == 5
        assert (await client.get("/v1/usage", params={"period": "year"})).status == 400
        assert (await client.get("/v1/usage", params={"since": "yesterday"})).status == 400
        r = await client.get("/v1/calls/c1")
        assert r.status == 200 and (await r.json())["turns"][0]["reply"] == "hello"
        r = await client.delete("/v1/calls/c1")
        assert r.status == 200 and (await r.json())["actor"] == "admin-api"
        assert (await client.get("/v1/calls/nope")).status == 404
        assert (await client.delete("/v1/calls/nope")).status == 404
    assert store.audit("c1")[0]["actor"] == "admin-api"


async def test_a_usage_key_reads_its_own_usage_and_an_admin_key_every_key(store):
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from sub300.agent.auth.authenticator import Principal
    from sub300.web.admin import add_admin_routes
    from sub300.web.auth import PRINCIPAL

    for call, key in (("c1", "k1"), ("c2", "k2")):
        store.call_started(call, "webrtc", T0, key)
        store.add_turn(call, 1, T0, "answered", "hi", "hello", {}, usage={"tts_chars": 5}, key_id=key)
    who: dict[str, Principal] = {}

    @web.middleware
    async def as_principal(request, handler):   # what web/auth.py's middleware leaves on the request
        request[PRINCIPAL] = who["now"]
        return await handler(request)

    app = web.Application(middlewares=[as_principal])
    add_admin_routes(app, store)
    async with TestClient(TestServer(app)) as client:
        who["now"] = Principal("k2", frozenset({"usage"}), "10.0.0.1")
        doc = await (await client.get("/v1/usage")).json()
        assert doc["key_id"] == "k2" and [r["key_id"] for r in doc["usage"]] == ["k2"]
        who["now"] = Principal("k9", frozenset({"usage", "admin"}), "10.0.0.1")
        assert [r["key_id"] for r in (await (await client.get("/v1/usage")).json())["usage"]] == ["k1", "k2"]
        who["now"] = Principal(None, frozenset({"usage", "admin", "calls", "model"}), "127.0.0.1", "open")
        assert len((await (await client.get("/v1/usage")).json())["usage"]) == 2    # authentication off


async def test_serve_wiring_adds_records_beside_the_metrics(tmp_path):
    from types import SimpleNamespace

    from aiohttp import web

    from sub300.agent.calls import ObserverGroup
    from sub300.agent.metrics import MetricsObserver
    from sub300.cli_records import start_records
    from sub300.web.server import SIGNALLING_KEY

    app = web.Application()
    app[SIGNALLING_KEY] = SimpleNamespace(observer=None)   # type: ignore[assignment]
    metrics = MetricsObserver(300.0)
    records = await start_records(records_config(tmp_path), app, metrics)
    assert records is not None and isinstance(app[SIGNALLING_KEY].observer, ObserverGroup)
    assert {r.resource.canonical for r in app.router.routes()} >= {"/v1/usage", "/v1/calls/{call_id}"}
    records.observer.on_lost[0](1)
    assert b"sub300_records_lost_total 1.0" in metrics.render() and b"sub300_records_queued 0.0" in metrics.render()
    await records.aclose()
    assert await start_records(records_config(tmp_path, enabled="false"), web.Application(), metrics) is None


@pytest.mark.slow
def test_cli_on_postgresql(postgres_url, monkeypatch, capsys, root_logging):  # noqa: F811
    from sub300.cli import main

    monkeypatch.setenv("SUB300_RECORDS_URL", postgres_url)
    assert main(["db", "upgrade"]) == 0 and "schema at revision 0001" in capsys.readouterr().out
    assert main(["usage", "--period", "month", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["period"] == "month"
