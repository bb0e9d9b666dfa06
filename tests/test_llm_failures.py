"""Every kind of LLM failure is one log line, a failed turn, and a spoken fallback.

Three layers:

* the client (models/llm_openai.py) against a *fake OpenAI-compatible
  endpoint* (aiohttp on 127.0.0.1, `fake_endpoint` below) that misbehaves on
  purpose, one scenario per path: each failure is a distinct `EndpointError`
  subclass whose message names the URL and what happened;
* a `Conversation` on fakes and virtual time with `FakeLlm` told to fail:
  `TurnFailed` with the kind, the fallback queued after what was spoken, the
  history, the metric, the next turn answered;
* the same conversation in real time with the real `OpenAIChatModel` pointed
  at the fake endpoint (sockets and virtual time do not mix: looptime would
  fast-forward the client's timeouts while the server's bytes are in flight).

The fakes are named as fakes; every wait is bounded.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time

import pytest
from aiohttp import web

from sub300.agent.events import AgentSpeech, TurnFailed, TurnFinished, event_to_dict
from sub300.agent.metrics import MetricsObserver
from sub300.agent.playout import PlayoutQueue
from sub300.agent.reply import Reply, ReplySettings
from sub300.agent.tasks import TaskOwner
from sub300.models.protocols import (
    EndpointDropped,
    EndpointError,
    EndpointHTTPError,
    EndpointProtocolError,
    EndpointStreamError,
    EndpointTimeout,
    EndpointUnreachable,
    ModelError,
)
from sub300.testing.fakes import FakeLlm, FakeStt, FakeTts, fake_engines, speech
from sub300.testing.scripted_caller import ScriptedCaller

from .config_helpers import configure
from .test_openai_llm import QUESTION, client_for, closed_port, delta, serve, sse

FALLBACK = "Sorry, I can't answer that right now."
THINK = ["Let", " me", " think", " about", " that", ".", " The", " answer"]   # "Let me think about that." then more


# ------------------------------------------------------------------ the fake endpoint
async def _stream(request: web.Request, chunks: list[bytes], *, then: str = "eof",
                  gap_s: float = 0.0) -> web.StreamResponse:
    """Stream ``chunks`` as SSE, then: ``eof`` (a clean end of the body), ``drop`` (close the TCP
    connection mid-body) or ``stall`` (send nothing more for 30 s)."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    try:
        for chunk in chunks:
            await resp.write(chunk)
            if gap_s:
                await asyncio.sleep(gap_s)
    except ConnectionError:   # the client gave up
        return resp
    if then == "drop":
        assert request.transport is not None
        request.transport.close()      # no terminating chunk: the body is incomplete
        return resp
    if then == "stall":    # until the client gives up (at most 30 s)
        for _ in range(600):
            if request.transport is None or request.transport.is_closing():
                break
            await asyncio.sleep(0.05)
    with contextlib.suppress(ConnectionError):   # after a stall the client has long gone
        await resp.write_eof()
    return resp


def _tokens(words: list[str]) -> list[bytes]:
    return [sse(delta(w)) for w in words]


def fake_endpoint() -> web.Application:
    """Fake of a misbehaving OpenAI-compatible server: ``POST /<scenario>/chat/completions``."""

    async def drop(request):           # "Let me think about that." then the connection drops
        return await _stream(request, _tokens(THINK[:6]), then="drop")

    async def eof_without_done(request):   # the body ends cleanly, but before [DONE] or a finish_reason
        return await _stream(request, _tokens(THINK[:6]), then="eof")

    async def error_event(request):
        return await _stream(request, _tokens(THINK[:6]) + [sse({"error": {"message": "model crashed"}})])

    async def http_500(request):
        return web.json_response({"error": {"message": "CUDA out of memory"}}, status=500)

    async def http_429(request):
        return web.json_response({"error": {"message": "rate limit reached"}}, status=429)

    async def stall_first(request):
        return await _stream(request, [b": keep-alive\n\n"], then="stall")

    async def stall_between(request):
        return await _stream(request, _tokens(THINK[:2]), then="stall")

    async def stall_with_keepalives(request):   # one piece, then only keep-alive comments and empty chunks
        idle = [b": keep-alive\n\n", sse(delta(""))] * 100   # 10 s of them: longer than the test's bound
        return await _stream(request, _tokens(THINK[:1]) + idle, gap_s=0.05, then="stall")

    async def endless(request):   # ignores max_tokens: "tick " for ever (well, 2000 times)
        return await _stream(request, [sse(delta("tick ")) for _ in range(2000)], gap_s=0.001)

    async def only_finish(request):
        return await _stream(request, [sse(delta(None, "stop"), "[DONE]")])

    async def malformed(request):
        return await _stream(request, _tokens(THINK[:3]) + [b"data: {\"choices\": [{\"delta\": \n\n"])

    async def close_before_headers(request):
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    async def ok(request):
        return await _stream(request, [sse(delta("Paris is lovely."), delta(None, "stop"), "[DONE]")])

    app = web.Application()
    for handler in (drop, eof_without_done, error_event, http_500, http_429, stall_first, stall_between,
                    stall_with_keepalives, endless, only_finish, malformed, close_before_headers, ok):
        app.router.add_post(f"/{handler.__name__}/chat/completions", handler)
    return app


# (scenario, error class, kind, words in the message, pieces received before the error)
CLIENT_SCENARIOS = [
    ("drop", EndpointDropped, "dropped", "connection dropped after 6 pieces", 6),
    ("eof_without_done", EndpointDropped, "dropped", "ended before [DONE]", 6),
    ("error_event", EndpointStreamError, "stream_error", "after 6 pieces of text: model crashed", 6),
    ("http_500", EndpointHTTPError, "http_5xx", "HTTP 500 Internal Server Error: CUDA out of memory", 0),
    ("http_429", EndpointHTTPError, "http_4xx", "HTTP 429 Too Many Requests: rate limit reached", 0),
    ("stall_first", EndpointTimeout, "timeout", "no first token within 0.3 s", 0),
    ("stall_between", EndpointTimeout, "timeout", "no text for 0.2 s after 2 pieces of text", 2),
    ("stall_with_keepalives", EndpointTimeout, "timeout", "no text for 0.2 s after 1 piece of text", 1),
    ("malformed", EndpointProtocolError, "malformed", "malformed event data", 3),
    ("close_before_headers", EndpointDropped, "dropped", "connection dropped before the response", 0),
]


@pytest.mark.asyncio(loop_scope="function")
@pytest.mark.timeout(30)
@pytest.mark.parametrize("scenario, cls, kind, words, received", CLIENT_SCENARIOS,
                         ids=[s[0] for s in CLIENT_SCENARIOS])
async def test_each_endpoint_failure_is_its_own_kind_naming_the_url(scenario, cls, kind, words, received):
    async with serve(fake_endpoint()) as url, \
            client_for(f"{url}/{scenario}", first_token_timeout_s=0.3, idle_timeout_s=0.2) as llm:
        got: list[str] = []
        t0 = time.monotonic()
        with pytest.raises(EndpointError) as info:
            async with asyncio.timeout(10):
                async for piece in llm.stream_chat(QUESTION, max_tokens=50):
                    got.append(piece)
        assert time.monotonic() - t0 < 5
    error = info.value
    assert type(error) is cls and error.kind == kind
    assert f"{url}/{scenario}/chat/completions" in str(error) and words in str(error), str(error)
    assert len(got) == received


@pytest.mark.asyncio(loop_scope="function")
@pytest.mark.timeout(30)
async def test_unreachable_and_empty_endpoints():
    async with client_for(f"http://127.0.0.1:{closed_port()}/v1") as llm:
        with pytest.raises(EndpointUnreachable, match="cannot connect") as info:
            _ = [p async for p in llm.stream_chat(QUESTION, max_tokens=8)]
    assert info.value.kind == "unreachable"
    # a server that ignores max_tokens: reading stops after max_tokens pieces, with a warning
    async with serve(fake_endpoint()) as url, client_for(f"{url}/endless") as llm:
        async with asyncio.timeout(5):
            assert [p async for p in llm.stream_chat(QUESTION, max_tokens=7)] == ["tick "] * 7
    # only a finish_reason: the client yields nothing and does not raise (the reply calls it empty)
    async with serve(fake_endpoint()) as url, client_for(f"{url}/only_finish") as llm:
        assert [p async for p in llm.stream_chat(QUESTION, max_tokens=8)] == []


# ------------------------------------------------------------------ conversation, virtual time
@pytest.fixture
def configured(config):
    return lambda **sections: configure(config, **{"stt__partial_interval_ms": 0, "llm__fallback_text": FALLBACK, **sections})


def failing_llm(error: ModelError, error_after: int, tokens=THINK, fail_times: int = 1) -> FakeLlm:
    return FakeLlm(tokens, first_token_s=0.045, per_token_s=0.01, error=error, error_after=error_after,
                   fail_times=fail_times)


async def two_questions(caller: ScriptedCaller) -> None:
    try:
        for _ in range(2):
            await caller.silence(0.5)
            await caller.say(speech(1.0))
            await caller.until_idle()
    finally:
        await caller.close()


def of(caller: ScriptedCaller, kind) -> list:
    return [e for e in caller.events if isinstance(e, kind)]


def observed(caller: ScriptedCaller) -> MetricsObserver:
    observer = MetricsObserver(300.0)
    caller.conversation.listeners.append(observer.call_started("test", "call-1"))
    return observer


def metric(observer: MetricsObserver, name: str, **labels) -> float:
    return observer.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.looptime
@pytest.mark.parametrize("speculate", [False, True], ids=["plain", "speculative"])
@pytest.mark.parametrize("error, kind", [
    (EndpointDropped("LLM endpoint http://x/v1/chat/completions: connection dropped after 6 pieces"), "dropped"),
    (EndpointStreamError("LLM endpoint http://x/v1/chat/completions: error event: model crashed"), "stream_error"),
    (EndpointTimeout("LLM endpoint http://x/v1/chat/completions: no text for 10 s (idle timeout)"), "timeout"),
    (ModelError("ct2:smollm2 generation failed: std::bad_alloc"), "model"),    # the embedded engine's kind
], ids=["dropped", "error_event", "idle_timeout", "ct2"])
async def test_failure_mid_answer_speaks_the_part_then_the_fallback(configured, caplog, error, kind, speculate):
    tts = FakeTts(delay_s=0.033, ms_per_piece=500.0)
    engines = fake_engines(stt=FakeStt("What is the meaning of life?", delay_s=0.105),
                           llm=failing_llm(error, error_after=6), tts=tts)
    caller = ScriptedCaller(engines, configured(llm__speculate=speculate), clock=asyncio.get_running_loop().time)
    observer = observed(caller)
    with caplog.at_level(logging.INFO):
        await two_questions(caller)

    (failed,) = of(caller, TurnFailed)
    assert failed.turn == 1 and failed.stage == "llm" and failed.failure == kind
    assert failed.error.startswith("LLM ") and str(error) in failed.error
    assert failed.reply == f"Let me think about that. {FALLBACK}"
    assert failed.ledger is not None and failed.ledger.notes["failed"] == f"llm: {kind}: {error}"
    assert failed.ledger.has("first_audio_out")    # the caller heard something
    # the complete sentence (its first 3 words are the first piece), then the fallback: nothing of " The answer"
    assert tts.pieces[:3] == ["Let me think", "about that.", FALLBACK]
    assert [e.text for e in of(caller, AgentSpeech) if e.turn == 1] == ["Let me think", "about that.", FALLBACK]
    # the next turn is answered, with the history of what was said
    (finished,) = of(caller, TurnFinished)
    assert finished.turn == 2 and finished.reply == "Let me think about that. The answer"
    assert caller.conversation.history.exchanges[0] == ("What is the meaning of life?",
                                                          f"Let me think about that. {FALLBACK}")
    assert engines.llm.requests[1][-2] == {"role": "assistant", "content": f"Let me think about that. {FALLBACK}"}
    # one log line for the failure, no traceback anywhere
    lines = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.ERROR and "turn 1 failed: LLM" in lines[0].getMessage()
    assert not any(r.exc_info for r in caplog.records), [r.getMessage() for r in caplog.records if r.exc_info]
    assert metric(observer, "sub300_llm_errors_total", transport="test", kind=kind) == 1
    assert metric(observer, "sub300_turns_total", transport="test", outcome="failed") == 1
    assert metric(observer, "sub300_turns_total", transport="test", outcome="answered") == 1
    event_to_dict(failed)   # the data channel can send it


@pytest.mark.looptime
async def test_failure_before_the_first_token_speaks_only_the_fallback(configured):
    tts = FakeTts(delay_s=0.033, ms_per_piece=500.0)
    error = EndpointHTTPError("LLM endpoint http://x/v1/chat/completions: HTTP 503 Service Unavailable", 503)
    engines = fake_engines(stt=FakeStt("Hi?", delay_s=0.105), llm=failing_llm(error, error_after=0), tts=tts)
    caller = ScriptedCaller(engines, configured(), clock=asyncio.get_running_loop().time)
    observer = observed(caller)
    await two_questions(caller)
    (failed,) = of(caller, TurnFailed)
    assert (failed.failure, failed.reply) == ("http_5xx", FALLBACK)
    assert tts.pieces[0] == FALLBACK
    # the fallback's audio went out: 500 ms of tone = 25 frames for turn 1, then turn 2's answer
    assert failed.ledger is not None and failed.ledger.voice_to_voice_ms is not None
    assert metric(observer, "sub300_llm_errors_total", transport="test", kind="http_5xx") == 1
    assert [e.turn for e in of(caller, TurnFinished)] == [2]


@pytest.mark.looptime
async def test_cut_mid_sentence_drops_the_unfinished_sentence(configured):
    tts = FakeTts(delay_s=0.033, ms_per_piece=500.0)
    error = EndpointDropped("LLM endpoint http://x/v1/chat/completions: connection dropped after 8 pieces")
    engines = fake_engines(stt=FakeStt("Why?", delay_s=0.105), llm=failing_llm(error, error_after=8), tts=tts)
    caller = ScriptedCaller(engines, configured(llm__speculate=False), clock=asyncio.get_running_loop().time)
    await two_questions(caller)
    (failed,) = of(caller, TurnFailed)
    assert failed.reply == f"Let me think about that. {FALLBACK}"
    assert failed.ledger is not None and failed.ledger.notes["unspoken"] == "The answer"


@pytest.mark.looptime
@pytest.mark.parametrize("tokens", [[], ["   "], [" ", "\n"], ["..."]], ids=["nothing", "space", "blank", "dots"])
async def test_empty_answer_is_a_failed_turn_with_the_fallback(configured, tokens):
    tts = FakeTts(delay_s=0.033, ms_per_piece=500.0)
    llm = FakeLlm(lambda messages: tokens if len(messages) <= 2 else ["Fine."], first_token_s=0.045)
    engines = fake_engines(stt=FakeStt("Hello?", delay_s=0.105), llm=llm, tts=tts)
    caller = ScriptedCaller(engines, configured(), clock=asyncio.get_running_loop().time)
    observer = observed(caller)
    await two_questions(caller)
    (failed,) = of(caller, TurnFailed)
    assert failed.failure == "empty" and failed.reply == FALLBACK and "no text to speak" in failed.error
    assert tts.pieces[-2:] == [FALLBACK, "Fine."]
    assert metric(observer, "sub300_llm_errors_total", transport="test", kind="empty") == 1
    assert [(e.turn, e.reply) for e in of(caller, TurnFinished)] == [(2, "Fine.")]


@pytest.mark.looptime
async def test_empty_fallback_text_stays_silent_but_still_fails_the_turn(configured):
    tts = FakeTts(delay_s=0.033, ms_per_piece=500.0)
    engines = fake_engines(stt=FakeStt("Hello?", delay_s=0.105), tts=tts,
                           llm=failing_llm(EndpointTimeout("LLM endpoint u: no first token within 5 s"), 0))
    caller = ScriptedCaller(engines, configured(llm__fallback_text=""), clock=asyncio.get_running_loop().time)
    await two_questions(caller)
    (failed,) = of(caller, TurnFailed)
    assert (failed.failure, failed.reply) == ("timeout", "")
    assert failed.ledger is not None and not failed.ledger.has("first_audio_out")
    assert FALLBACK not in tts.pieces and caller.conversation.history.exchanges[0] == ("Hello?", "")


# ------------------------------------------------------------------ no ExceptionGroup escapes
class FakeBrokenTts(FakeTts):
    """Fake TTS whose synthesis fails with a ModelError (a dead voice)."""

    async def synthesize_async(self, text, *, ticket=None):
        self.pieces.append(text)
        await asyncio.sleep(0.01)
        raise ModelError("fake-tts: voice crashed")
        yield  # pragma: no cover - makes this an async generator


@pytest.mark.looptime
async def test_reply_task_fails_with_the_original_typed_error_not_a_group():
    owner = TaskOwner("test", expected=(ModelError,))
    playout = PlayoutQueue(16000, asyncio.get_running_loop().time)
    reply = Reply(turn=1, messages=QUESTION, llm=FakeLlm(["Hello there."]), tts=FakeBrokenTts(), playout=playout,
                  clock=asyncio.get_running_loop().time, emit=lambda e: None,
                  settings=ReplySettings(60, 0.0, 20, fallback_text=FALLBACK)).start(owner)
    assert reply.task is not None
    with pytest.raises(ModelError, match="voice crashed") as info:
        await reply.task
    assert not isinstance(info.value, BaseExceptionGroup)
    await owner.aclose()


@pytest.mark.looptime
async def test_tts_failure_is_a_failed_turn_without_traceback(configured, caplog):
    engines = fake_engines(stt=FakeStt("Hello?", delay_s=0.105), tts=FakeBrokenTts())
    caller = ScriptedCaller(engines, configured(), clock=asyncio.get_running_loop().time)
    with caplog.at_level(logging.INFO):
        await two_questions(caller)
    failed = of(caller, TurnFailed)
    assert [(e.turn, e.stage, e.failure) for e in failed] == [(1, "tts", "model"), (2, "tts", "model")]
    assert "crashed" not in " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR
                                     and "voice crashed" not in r.getMessage())
    assert not any(r.exc_info for r in caplog.records)


def test_unwrap_keeps_the_first_error_and_notes_the_rest():
    from sub300.agent.reply import _unwrap

    first, second = EndpointDropped("a"), ModelError("b")
    error = _unwrap(BaseExceptionGroup("g", [first, ExceptionGroup("inner", [second])]))
    assert error is first and any("b" in note for note in getattr(first, "__notes__", []))
    assert _unwrap(ExceptionGroup("one", [second])) is second


# ------------------------------------------------------------------ conversation, real time, real client
@pytest.mark.asyncio(loop_scope="function")
@pytest.mark.timeout(60)
@pytest.mark.parametrize("scenario, kind, heard", [
    # ~2-3 s of real time each (slow tier): the kinds are covered on virtual time above
    pytest.param("drop", "dropped", f"Let me think about that. {FALLBACK}", marks=pytest.mark.slow),
    pytest.param("only_finish", "empty", FALLBACK, marks=pytest.mark.slow),
    pytest.param("http_429", "http_4xx", FALLBACK, marks=pytest.mark.slow),
])
async def test_conversation_with_the_real_client_on_a_failing_endpoint(config, caplog, scenario, kind, heard):
    from sub300.models.llm_openai import OpenAIChatModel

    c = copy.deepcopy(config)
    c.llm.fallback_text, c.stt.partial_interval_ms = FALLBACK, 0
    # "Let me think about that." is one piece: with the default 3-word cut the reply stops reading the
    # stream while "Let me think" is synthesized, and aiohttp drops what it had buffered of the rest
    # when the connection then breaks (its reader raises before returning buffered data)
    c.tts.first_piece_max_words = 6
    async with serve(fake_endpoint()) as url:
        llm = OpenAIChatModel(f"{url}/{scenario}", "test-model", first_token_timeout_s=2.0, idle_timeout_s=2.0)
        tts = FakeTts(delay_s=0.03, ms_per_piece=100.0)
        caller = ScriptedCaller(fake_engines(stt=FakeStt("Tell me something.", delay_s=0.05), llm=llm, tts=tts), c)
        try:
            with caplog.at_level(logging.INFO):
                await caller.silence(0.1)
                await caller.say(speech(0.4))
                await caller.until_idle()
                llm.endpoint.url = f"{url}/ok/chat/completions"     # the endpoint recovers: the call goes on
                await caller.silence(0.1)
                await caller.say(speech(0.4))
                await caller.until_idle()
        finally:
            await caller.close()
            with contextlib.suppress(Exception):
                await llm.aclose()
    (failed,) = of(caller, TurnFailed)
    assert (failed.turn, failed.failure, failed.reply) == (1, kind, heard)
    assert failed.error.startswith(f"LLM endpoint {url}/{scenario}/chat/completions: ")
    assert [(e.turn, e.reply) for e in of(caller, TurnFinished)] == [(2, "Paris is lovely.")]
    # this test's endpoint sends no usage chunk: the client says so once (models/llm_openai.py), apart from the failure
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING and "sent no usage" not in r.getMessage()]
    assert len(errors) == 1 and errors[0].getMessage().startswith("turn 1 failed: LLM"), \
        [r.getMessage() for r in errors]
    assert not any(r.exc_info for r in caplog.records)


# ------------------------------------------------------------------ an engine's bug, the embedded engine
class FakeBuggyLlm:
    """Fake LanguageModel with a bug: yields one sentence, then raises a plain ValueError."""

    name = "fake-buggy"

    async def stream_chat(self, messages, *, max_tokens, temperature=0.0, ticket=None):
        await asyncio.sleep(0.045)
        yield "Let me think about that."
        await asyncio.sleep(0.01)
        raise ValueError("index out of range in the detokenizer")


@pytest.mark.looptime
async def test_an_engine_bug_is_logged_with_its_traceback_and_still_answered(configured, caplog):
    tts = FakeTts(delay_s=0.033, ms_per_piece=500.0)
    caller = ScriptedCaller(fake_engines(stt=FakeStt("Hm?", delay_s=0.105), llm=FakeBuggyLlm(), tts=tts),
                            configured(), clock=asyncio.get_running_loop().time)
    with caplog.at_level(logging.INFO):
        await two_questions(caller)
    failed = of(caller, TurnFailed)
    assert [(e.turn, e.failure, e.reply) for e in failed] == [(n, "internal", f"Let me think about that. {FALLBACK}")
                                                             for n in (1, 2)]
    assert "unexpected ValueError: index out of range" in failed[0].error
    bugs = [r for r in caplog.records if r.exc_info]
    assert len(bugs) == 2 and all(isinstance(r.exc_info[1], ValueError) for r in bugs)   # a bug keeps its traceback


class FakeBrokenGenerator:
    """Fake of ctranslate2.Generator whose generation fails (as a CUDA OOM would)."""

    def generate_batch(self, *args, **kwargs):
        raise RuntimeError("CUDA failed with error out of memory")


@pytest.mark.timeout(120)
@pytest.mark.asyncio(loop_scope="function")
@pytest.mark.parametrize("breakage", ["generation", "tokenizer"])
async def test_embedded_engine_failures_take_the_same_path(engines, config, monkeypatch, caplog, breakage):
    """The real CTranslate2 engine (bundled SmolLM2), broken two ways: a failed turn and the fallback."""
    llm = engines.llm
    if breakage == "generation":
        monkeypatch.setattr(llm.scheduler, "_generator", FakeBrokenGenerator())
        words = "generation failed: CUDA failed with error out of memory"
    else:
        def broken_encode(messages):
            raise ValueError("tokenizer: invalid UTF-8")
        monkeypatch.setattr(llm, "encode_prompt", broken_encode)
        words = "cannot encode the prompt: tokenizer: invalid UTF-8"
    c = copy.deepcopy(config)
    c.llm.fallback_text, c.stt.partial_interval_ms = FALLBACK, 0
    tts = FakeTts(delay_s=0.03, ms_per_piece=300.0)
    caller = ScriptedCaller(fake_engines(stt=FakeStt("Tell me something.", delay_s=0.05), llm=llm, tts=tts), c)
    try:
        with caplog.at_level(logging.INFO):
            await caller.silence(0.3)
            await caller.say(speech(0.6))
            await caller.until_idle()
    finally:
        await caller.close()
    (failed,) = of(caller, TurnFailed)
    assert (failed.stage, failed.failure, failed.reply) == ("llm", "model", FALLBACK)
    assert failed.error.startswith(f"LLM {llm.name}") and words in failed.error, failed.error
    assert tts.pieces == [FALLBACK]
    assert not any(r.exc_info for r in caplog.records)


def test_no_task_group_in_the_project_can_leak_an_exception_group():
    """Source audit: every ``asyncio.TaskGroup`` sits in a ``try`` that turns its group back into the
    typed error (``except BaseExceptionGroup`` → ``_unwrap``) and nothing uses ``except*``.  ``gather``
    makes no groups; each one here has ``return_exceptions=True``, so one failure neither hides the
    others' nor leaves them running unawaited (the callers log what comes back)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    files = [p for layer in ("agent", "media", "web", "models", "sub300") for p in (root / layer).rglob("*.py")]
    assert len(files) > 40
    task_groups = 0
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        guarded: set[int] = set()
        for node in ast.walk(tree):
            assert not isinstance(node, ast.TryStar), f"{path}:{node.lineno}: except* hands on a group"
            if isinstance(node, ast.Try) and any(
                    isinstance(h.type, ast.Name) and h.type.id in {"BaseExceptionGroup", "ExceptionGroup"}
                    and "_unwrap" in ast.unparse(h) for h in node.handlers):
                guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in {"asyncio.TaskGroup", "TaskGroup"}:
                task_groups += 1
                assert id(node) in guarded, f"{path}:{node.lineno}: a TaskGroup whose ExceptionGroup can escape"
            if isinstance(node, ast.Call) and ast.unparse(node.func) in {"asyncio.gather", "gather"}:
                assert any(k.arg == "return_exceptions" for k in node.keywords), \
                    f"{path}:{node.lineno}: gather without return_exceptions"
    assert task_groups >= 1    # agent/reply.py's
