"""Tools the LLM can call: schemas from typed functions, streamed tool calls, the turn that runs them.

Fast: the reply's tests run a `ScriptedCaller` on virtual time (looptime) with `FakeToolLlm` (the
fake hosted API's rules, in process); the client's tests read `FakeToolsApi` over HTTP on 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import enum
import json
from typing import Annotated, Literal

import pytest

from sub300.agent.behaviour import Behaviour
from sub300.agent.events import AgentSpeech, BargeInEvent, ToolCalled, TurnFailed, TurnFinished
from sub300.agent.ledger import TurnLedger
from sub300.agent.metrics import MetricsObserver
from sub300.agent.tools import ToolDefinitionError, ToolsUnsupported, function_tool, run_tool
from sub300.models.llm_openai import OpenAIChatModel
from sub300.models.protocols import EndpointProtocolError, ToolCall, accepts_tools
from sub300.testing.fake_openai_tools import FakeToolLlm, FakeToolsApi, tool_call_deltas, weather_rules
from sub300.testing.fakes import FakeLlm, FakeStt, FakeTts, fake_engines, speech
from sub300.testing.scripted_caller import ScriptedCaller

from .config_helpers import configure

pytest.importorskip("looptime", reason="virtual time needs the test extra (looptime)")


# ------------------------------------------------------------------ schemas
class Unit(enum.Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


def test_function_tool_makes_the_openai_schema_from_the_signature():
    @function_tool
    async def get_weather(city: Annotated[str, "the city, e.g. Paris"], unit: Unit = Unit.CELSIUS,
                          days: list[int] | None = None, detail: Literal["short", "long"] = "short",
                          wind: bool = False, above: float | None = None) -> str:
        """Today's weather
        in one city.

        Not this paragraph."""
        return ""

    assert get_weather.name == "get_weather" and get_weather.timeout_s is None
    function = get_weather.schema()["function"]
    assert function["description"] == "Today's weather in one city."
    assert function["parameters"] == {
        "type": "object", "additionalProperties": False, "required": ["city"],
        "properties": {
            "city": {"type": "string", "description": "the city, e.g. Paris"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},   # $ref inlined
            "days": {"anyOf": [{"type": "array", "items": {"type": "integer"}}, {"type": "null"}], "default": None},
            "detail": {"type": "string", "enum": ["short", "long"], "default": "short"},
            "wind": {"type": "boolean", "default": False},
            "above": {"anyOf": [{"type": "number"}, {"type": "null"}], "default": None},
        }}

    @function_tool(name="lookup", description="Find an order.", timeout_s=2.0)
    def find(order: int) -> dict:
        return {}

    assert (find.name, find.description, find.timeout_s) == ("lookup", "Find an order.", 2.0)
    def untyped(city):
        return city

    with pytest.raises(ToolDefinitionError, match="needs a type hint"):
        function_tool(untyped)
    with pytest.raises(ToolDefinitionError, match=r"\*args"):
        @function_tool
        def spread(*args: int) -> int:
            return 0


async def test_run_tool_validates_the_models_arguments_and_feeds_errors_back():
    seen = []

    @function_tool
    def add(a: int, unit: Unit = Unit.CELSIUS) -> dict:
        seen.append((a, unit))
        return {"sum": a + 1, "unit": unit.value}

    @function_tool
    async def broken(city: str) -> str:
        raise RuntimeError("the weather service is down")

    tools = {"add": add, "broken": broken}

    async def run(name, arguments):
        return await run_tool(tools, ToolCall("c1", name, arguments), default_timeout_s=1.0)

    ok = await run("add", '{"a": "41", "unit": "fahrenheit"}')     # lax: "41" is an int, the Enum by value
    assert (ok.outcome, json.loads(ok.content)) == ("ok", {"sum": 42, "unit": "fahrenheit"})
    assert seen == [(41, Unit.FAHRENHEIT)]
    bad = await run("add", '{"b": 1}')
    assert bad.outcome == "invalid_arguments" and seen == [(41, Unit.FAHRENHEIT)]   # never called
    assert bad.content == ("error: invalid arguments for add: a: Missing required argument; "
                           "b: Unexpected keyword argument")
    assert (await run("add", "{not json")).outcome == "invalid_arguments"
    assert (await run("add", "[1]")).content == "error: the arguments of add must be a JSON object"
    failed = await run("broken", '{"city": "Paris"}')
    assert (failed.outcome, failed.content) == ("error", "error: broken failed: RuntimeError: the weather service is down")
    unknown = await run("nope", "{}")
    assert unknown.outcome == "unknown_tool" and "add, broken" in unknown.content
    assert ok.message() == {"role": "tool", "tool_call_id": "c1", "content": ok.content}


# ------------------------------------------------------------------ the OpenAI client
async def test_the_client_assembles_streamed_tool_calls_by_index():
    deltas = tool_call_deltas([ToolCall("a", "get_weather", '{"city": "Paris"}'),
                               ToolCall("b", "get_weather", '{"city": "Tokyo"}')])
    # each call's first delta has its id and name, then arguments in 3 pieces, the two calls interleaved
    assert [d[0]["index"] for d in deltas] == [0, 1, 0, 1, 0, 1, 0, 1]
    assert all("id" not in d[0] for d in deltas[2:])
    tool = get_weather()
    async with FakeToolsApi() as api:
        model = OpenAIChatModel(api.base_url, "fake")
        try:
            question = [{"role": "user", "content": "What's the weather in Paris and Tokyo?"}]
            calls = [x async for x in model.stream_chat(question, max_tokens=50, tools=[tool.schema()])]
            assert calls == [ToolCall("call_1_0", "get_weather", '{"city": "Paris"}'),
                             ToolCall("call_1_1", "get_weather", '{"city": "Tokyo"}')]
            sent = api.requests[0]
            assert sent["tools"] == [tool.schema()] and sent["tool_choice"] == "auto"
            exchange = [{"role": "assistant", "content": None, "tool_calls": [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in calls]}, *({"role": "tool", "tool_call_id": c.id, "content": f"sunny in {c.id}"}
                                    for c in calls)]
            text = [x async for x in model.stream_chat([*question, *exchange], max_tokens=50,
                                                         tools=[tool.schema()])]
            assert "".join(text) == "Here is what I found: sunny in call_1_0. sunny in call_1_1."
            assert api.requests[1]["messages"][1:] == exchange   # the tool exchange as it is
            # no tools asked: no tools sent
            plain = [x async for x in model.stream_chat(question, max_tokens=50)]
            assert "".join(plain) == "I am a fake model. Ask me about the weather."
            assert "tools" not in api.requests[2]
        finally:
            await model.aclose()


def test_a_tool_call_without_an_id_or_a_name_is_malformed():
    model = OpenAIChatModel("http://127.0.0.1:9/v1", "fake")
    from sub300.models.llm_openai import _ToolCallAssembly

    calls = _ToolCallAssembly(model._error)
    model._parse_chunk(json.dumps({"choices": [{"delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": '{"ci'}}]}, "finish_reason": None}]}), calls=calls)
    with pytest.raises(EndpointProtocolError, match="without an id or a name"):
        calls.complete()


def weather(city: Annotated[str, "the city"]) -> str:
    """Today's weather in a city."""
    return f"18 degrees and sunny in {city}"


def get_weather():
    return function_tool(name="get_weather")(weather)


# ------------------------------------------------------------------ the turn (virtual time)
@pytest.fixture
def configured(config):
    return lambda **sections: configure(config, **{"stt__partial_interval_ms": 0, "stt__tail_ms": 0, **sections})


def on(llm, config, *tools, tts_ms=500.0, text="What's the weather in Paris?"):
    engines = fake_engines(stt=FakeStt(text, delay_s=0.1), llm=llm, tts=FakeTts(delay_s=0.03, ms_per_piece=tts_ms))
    return ScriptedCaller(engines, config, clock=asyncio.get_running_loop().time,
                          behaviour=Behaviour(tools=tuple(tools)))


def of(caller, kind):
    return [e for e in caller.events if isinstance(e, kind)]


async def ask(caller, seconds=1.0):
    try:
        await caller.silence(0.5)
        await caller.say(speech(seconds))
        await caller.until_idle()
    finally:
        await caller.close()


@pytest.mark.looptime
async def test_a_turn_calls_the_tool_and_speaks_its_result(configured):
    llm = FakeToolLlm()
    caller = on(llm, configured(llm__speculate=False), get_weather())
    await ask(caller)
    (turn,) = of(caller, TurnFinished)
    assert turn.reply == "Here is what I found: 18 degrees and sunny in Paris."
    (called,) = of(caller, ToolCalled)
    assert (called.name, json.loads(called.arguments), called.outcome) == ("get_weather", {"city": "Paris"}, "ok")
    ledger = turn.ledger
    stages = ledger.stages_ms()
    assert list(stages)[:4] == ["endpointing", "stt", "llm_tool_call", "tool"]
    assert stages["llm_tool_call"] == pytest.approx(50.0)        # the fake's call_s: the tool call was complete
    assert sum(stages.values()) == pytest.approx(ledger.voice_to_voice_ms)
    assert ledger.notes["tool_calls"] == 1 and ledger.notes["tool_rounds"] == 1 and "filler" not in ledger.notes
    assert "tool" in ledger.to_dict()["stages_ms"] and "tools: 1 call(s) in 1 round(s)" in ledger.format_table()
    assert TurnLedger.from_dict(ledger.to_dict()).stages_ms().keys() == stages.keys()
    # the model's second request carried its call and the result; the history keeps the exchange
    second = llm.requests[1]
    assert [m["role"] for m in second[-3:]] == ["user", "assistant", "tool"]
    assert second[-1]["content"] == "18 degrees and sunny in Paris"
    history = caller.conversation.history.messages_for("thanks")
    assert [m["role"] for m in history[1:]] == ["user", "assistant", "tool", "assistant", "user"]
    assert llm.tools[0] == ["get_weather"]


@pytest.mark.looptime
async def test_a_slow_tool_gets_the_filler_then_its_timeout_is_said(configured):
    @function_tool(name="get_weather", timeout_s=2.0)
    async def slow(city: str) -> str:
        await asyncio.sleep(10)
        return "never"

    caller = on(FakeToolLlm(), configured(), slow)
    await ask(caller)
    (turn,) = of(caller, TurnFinished)
    assert [e.text for e in of(caller, AgentSpeech)][0] == "One moment."
    assert turn.reply == "One moment. Here is what I found: error: get_weather did not answer within 2 seconds."
    ledger = turn.ledger
    assert ledger.notes["filler"] == "One moment." and ledger.notes["tool_ms"] == pytest.approx(2000.0)
    # voice-to-voice measures the filler: the tool stage ends where it was queued, 700 ms after the call
    stages = ledger.stages_ms()
    assert stages["tool"] == pytest.approx(700.0)
    assert sum(stages.values()) == pytest.approx(ledger.voice_to_voice_ms)
    assert ledger.marks["first_audio_out"] < ledger.marks["tool_end"]
    assert [(e.outcome, e.duration_ms) for e in of(caller, ToolCalled)] == [("timeout", 2000.0)]


@pytest.mark.looptime
async def test_a_failing_tool_is_said_and_counted(configured):
    @function_tool(name="get_weather")
    def down(city: str) -> str:
        raise ConnectionError("weather service unreachable")

    metrics = MetricsObserver(300)
    caller = on(FakeToolLlm(), configured(llm__tool_filler_text=""), down)
    caller.conversation.listeners.append(metrics.call_started("webrtc", "c1"))
    await ask(caller)
    (turn,) = of(caller, TurnFinished)
    assert turn.reply == ("Here is what I found: error: get_weather failed: ConnectionError: "
                          "weather service unreachable.")
    assert metrics.registry.get_sample_value(
        "sub300_tool_calls_total", {"transport": "webrtc", "tool": "get_weather", "outcome": "error"}) == 1
    assert metrics.registry.get_sample_value(
        "sub300_tool_duration_seconds_count", {"transport": "webrtc", "tool": "get_weather"}) == 1


@pytest.mark.looptime
async def test_invalid_arguments_go_back_to_the_model(configured):
    def rules(messages, names):
        if messages[-1]["role"] == "tool":
            return weather_rules(messages, names)
        return [ToolCall("c1", "get_weather", '{"town": "Paris"}')]

    llm = FakeToolLlm(rules)
    caller = on(llm, configured(), get_weather())
    await ask(caller)
    (turn,) = of(caller, TurnFinished)
    assert llm.requests[1][-1]["content"] == ("error: invalid arguments for get_weather: city: Missing required "
                                              "argument; town: Unexpected keyword argument")
    assert [e.outcome for e in of(caller, ToolCalled)] == ["invalid_arguments"]
    assert turn.reply.startswith("Here is what I found: error: invalid arguments")


@pytest.mark.looptime
async def test_tool_rounds_are_bounded(configured):
    llm = FakeToolLlm(lambda messages, names: [ToolCall(f"c{len(messages)}", "get_weather", '{"city": "Paris"}')])
    caller = on(llm, configured(llm__max_tool_rounds=2), get_weather())
    await ask(caller)
    (failed,) = of(caller, TurnFailed)
    assert failed.failure == "tool_rounds" and "after 2 rounds" in failed.error
    assert failed.reply == "Sorry, I can't answer that right now."     # the fallback line
    assert len(llm.requests) == 3 and len(of(caller, ToolCalled)) == 2


@pytest.mark.looptime
async def test_barge_in_cancels_a_running_tool(configured):
    ended = []

    @function_tool(name="get_weather", timeout_s=30.0)
    async def slow(city: str) -> str:
        try:
            await asyncio.sleep(20)
            return "never"
        finally:
            ended.append(asyncio.get_running_loop().time())

    caller = on(FakeToolLlm(), configured(), slow, tts_ms=2000.0)
    try:
        await caller.silence(0.5)
        await caller.say(speech(1.0))
        await caller.wait_until(lambda: caller.playout.audible)     # the filler
        await caller.silence(0.2)
        await caller.say(speech(0.6, seed=2))                       # interrupts the filler
        await caller.wait_until(lambda: bool(ended))
        cancelled_at = caller.clock()
        assert ("cancelled" in [e.outcome for e in of(caller, ToolCalled)])
    finally:
        await caller.close()
    assert [e.outcome for e in of(caller, BargeInEvent)][:2] == ["paused", "interrupted"]
    assert len(ended) == 1 and ended[0] < cancelled_at < 10       # cancelled long before its 20 s
    first = of(caller, TurnFinished)[0]
    assert [e.text for e in of(caller, AgentSpeech)][0] == "One moment."
    assert first.ledger.notes["interrupted"] is True and first.reply == ""   # 0.28 s of 2 s: no whole word heard


@pytest.mark.looptime
async def test_hang_up_cancels_and_awaits_a_running_tool(configured):
    ended = []

    @function_tool(name="get_weather", timeout_s=30.0)
    async def slow(city: str) -> str:
        try:
            await asyncio.sleep(20)
            return "never"
        finally:
            ended.append("cancelled")

    caller = on(FakeToolLlm(), configured(), slow)
    await caller.silence(0.5)
    await caller.say(speech(1.0))
    await caller.wait_until(lambda: "tool_start" in caller.conversation._ledgers[1].marks)
    await caller.close()
    assert ended == ["cancelled"] and [e.outcome for e in of(caller, ToolCalled)] == ["cancelled"]


@pytest.mark.looptime
async def test_a_speculation_calls_no_tool_before_the_turn_is_committed(configured):
    calls = []

    @function_tool(name="get_weather")
    def counted(city: str) -> str:
        calls.append(city)
        return "sunny"

    caller = on(FakeToolLlm(), configured(), counted)
    try:
        await caller.silence(0.5)
        await caller.say(speech(0.6))
        await caller.wait_until(lambda: caller.conversation.speculating)
        await caller.say(speech(0.4, seed=1))      # the caller goes on: the speculation is thrown away
        await caller.until_idle()
    finally:
        await caller.close()
    assert calls == ["Paris"]                        # once, for the committed reply
    (turn,) = of(caller, TurnFinished)
    assert turn.ledger.notes["speculation_wasted"] == 1


async def test_tools_on_a_model_that_cannot_call_them_is_an_error(config):
    from sub300.models.llm_ct2 import CTranslate2ChatModel

    assert not accepts_tools(CTranslate2ChatModel) and accepts_tools(OpenAIChatModel)   # the embedded model: none
    with pytest.raises(ToolsUnsupported, match="cannot call tools"):
        on(FakeLlm(), config, get_weather())


@pytest.mark.looptime
async def test_a_scripted_caller_asks_the_fake_hosted_api_for_the_weather(configured):
    """End to end over HTTP: the OpenAI client streams the fake API's tool call, the real function runs,
    the spoken reply has its result."""
    async with FakeToolsApi() as api:
        llm = OpenAIChatModel(api.base_url, "fake")
        try:
            caller = on(llm, configured(), get_weather())
            await ask(caller)
        finally:
            await llm.aclose()
    (turn,) = of(caller, TurnFinished)
    assert turn.reply == "Here is what I found: 18 degrees and sunny in Paris."
    assert "tool" in turn.ledger.stages_ms() and turn.ledger.notes["tool_calls"] == 1
    assert [m["role"] for m in api.requests[1]["messages"]][-2:] == ["assistant", "tool"]
