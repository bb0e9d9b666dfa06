"""The Python API (sub300/api.py, hooks.py, server.py): an Agent's configuration, engines, tools and hooks, and
a Server started and stopped in the test's own event loop on port 0."""
from __future__ import annotations

import asyncio
import logging
from typing import Annotated

import aiohttp
import pytest

from sub300 import Agent, CallEnded, CallStarted, Server, Tool, function_tool
from sub300.agent.config import ConfigError, load_config
from sub300.agent.engines import Engines
from sub300.agent.events import AgentSpeech, CallUsage, StateChanged, ToolCalled, TranscriptEvent, TurnFinished
from sub300.agent.tools import ToolsUnsupported
from sub300.testing.fakes import FakeLlm, FakeStt, FakeTts, FakeVad, speech
from sub300.testing.scripted_caller import ScriptedCaller


def get_weather(city: Annotated[str, "the city"]) -> str:
    """Today's weather in a city."""
    return f"Sunny in {city}."


def fakes(text: str = "What is the weather?", reply: tuple[str, ...] = ("Sunny", " today.")) -> dict[str, object]:
    return {"vad": FakeVad(), "stt": FakeStt(text, delay_s=0.1), "llm": FakeLlm(reply), "tts": FakeTts()}


def test_an_agent_is_its_configuration_with_engines_tools_and_instructions_on_top(tmp_path):
    toml = tmp_path / "agent.toml"
    toml.write_text('[llm]\nsystem_prompt = "From the file."\n')
    assert Agent(config=str(toml)).behaviour.system_prompt("x") == "x"   # no instructions: the configured prompt
    assert Agent(config=toml).config.llm.system_prompt == "From the file."
    agent = Agent(instructions="You are a weather line.", tools=[get_weather], config=load_config(environ={}),
                  engines={"stt": "openai", "turn": "smart-turn", "tts": FakeTts()})
    assert (agent.config.stt.engine, agent.config.turn.detector, agent.config.tts.engine) == ("openai", "smart-turn",
                                                                                             "piper")
    assert set(agent.engine_objects) == {"tts"}
    (tool,) = agent.behaviour.tools
    assert isinstance(tool, Tool) and tool.name == "get_weather" and tool.description == "Today's weather in a city."
    assert agent.behaviour.system_prompt("configured") == "You are a weather line."
    with pytest.raises(ConfigError, match=r"stt\.engine = 'nope' \(from Agent\(engines=...\)\) is not allowed: "
                                          r"expected one of 'faster-whisper', 'openai'"):
        Agent(engines={"stt": "nope"}, config=load_config(environ={}))
    with pytest.raises(ValueError, match="engines: no stage 'asr'"):
        Agent(engines={"asr": "openai"}, config=load_config(environ={}))
    with pytest.raises(ValueError, match="two tools are named 'get_weather'"):
        Agent(tools=[get_weather, function_tool(get_weather)], config=load_config(environ={}))
    with pytest.raises(ValueError, match="no hook named 'turn_end'"):
        Agent(on={"turn_end": print}, config=load_config(environ={}))


@pytest.mark.looptime
async def test_hooks_hear_a_call_sync_and_async_owned_by_the_call(config, caplog):
    agent = Agent(config=config)
    heard: list[tuple[str, object]] = []
    for name in ("call_started", "turn_started", "transcript", "agent_speech", "turn_ended", "call_usage",
                 "call_ended"):
        agent.on(name)(lambda event, name=name: heard.append((name, event)))

    @agent.on("turn_ended")
    def broken(event):
        raise RuntimeError("a user's bug")

    finished: list[tuple[str, float]] = []

    @agent.on("turn_ended")
    async def store(event, call):
        await asyncio.sleep(1.0)   # e.g. a database write: owned by the call, awaited at its end
        finished.append((call.call_id, event.ledger.voice_to_voice_ms))

    @agent.on("call_ended")
    async def too_slow(event):
        await asyncio.sleep(3600)  # still running past the grace: cancelled

    caller = ScriptedCaller(Engines(**fakes()), config, clock=asyncio.get_running_loop().time)
    caller.conversation.listeners.append(agent.hooks.call_started("test", "call-1"))
    with caplog.at_level(logging.WARNING):
        try:
            await caller.silence(0.5)
            await caller.say(speech(1.0))
            await caller.until_idle()
        finally:
            await caller.close()
        agent.hooks.call_ended("test", "call-1", "hung up")
        t0 = asyncio.get_running_loop().time()
        await agent.hooks.aclose()
        assert asyncio.get_running_loop().time() - t0 == pytest.approx(5.0, abs=0.1)   # the grace, then cancelled
    names = [name for name, _ in heard]
    assert names[0] == "call_started" and names[-2:] == ["call_usage", "call_ended"]
    assert names.index("turn_started") < names.index("agent_speech") < names.index("turn_ended")
    events = dict(heard)
    assert events["call_started"] == CallStarted("call-1", "test", None)
    assert isinstance(events["turn_started"], StateChanged) and events["turn_started"].state == "caller_speaking"
    assert [e.final for n, e in heard if n == "transcript" and isinstance(e, TranscriptEvent)][-1] is True
    assert isinstance(events["agent_speech"], AgentSpeech)
    turn = events["turn_ended"]
    assert isinstance(turn, TurnFinished) and turn.reply == "Sunny today." and turn.ledger.voice_to_voice_ms > 0
    assert isinstance(events["call_usage"], CallUsage)
    assert events["call_ended"] == CallEnded("call-1", "test", "hung up")
    assert finished == [("call-1", turn.ledger.voice_to_voice_ms)]           # the async hook was awaited
    assert "hook turn_ended (test_hooks_hear_a_call_sync_and_async_owned_by_the_call.<locals>.broken) failed" \
        in caplog.text
    assert "1 hook(s) still running 5 s after the call ended; cancelled" in caplog.text


async def test_the_tool_called_hook_hears_tool_calls_only(config):
    agent = Agent(config=config)
    heard: list[object] = []
    agent.on("tool_called")(heard.append)
    listen = agent.hooks.call_started("test", "call-2")
    call = ToolCalled(1, "get_weather", '{"city": "Paris"}', 12.0, "ok", "Sunny")
    for event in (StateChanged("caller_speaking"), call, AgentSpeech(1, "Sunny.")):
        listen(event)
    agent.hooks.call_ended("test", "call-2", "hung up")
    await agent.hooks.aclose()
    assert heard == [call]


async def test_a_server_in_the_programs_own_loop_on_port_0(config, tmp_path):
    config = config.model_copy(deep=True)   # the session's is shared
    config.records.enabled, config.records.url = False, f"sqlite:///{tmp_path}/keys.db"
    agent = Agent(config=config, engines=fakes())
    calls: list[object] = []
    agent.on("call_started")(calls.append)
    agent.on("call_ended")(calls.append)
    async with Server(agent, port=0) as server, aiohttp.ClientSession() as session:
        assert server.port and server.url == f"http://127.0.0.1:{server.port}"
        async with session.get(server.url + "/readyz") as ready:
            assert ready.status == 200
        async with session.ws_connect(server.url + "/ws/pcm?rate=16000") as ws:   # a call: the hooks watch it
            await ws.send_bytes(bytes(640))
            await ws.close()
        for _ in range(100):
            if len(calls) == 2:
                break
            await asyncio.sleep(0.01)
    assert server.status == 0
    started, ended = calls
    assert isinstance(started, CallStarted) and started.transport == "pcm"
    assert isinstance(ended, CallEnded) and ended.call_id == started.call_id
    with pytest.raises(ToolsUnsupported, match="cannot call tools"):     # the embedded-like fake has no tools=
        await Server(Agent(config=config, engines=fakes(), tools=[get_weather]), port=0).start()


async def test_the_readmes_tools_snippet_runs_as_written():
    """README *Tools*: the block defines two tools and an agent; executed as written, the schemas are
    the ones its text describes and the async tool answers."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("### Tools", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict[str, object] = {}
    exec(compile(block, "README.md (Tools)", "exec"), scope)
    agent = scope["agent"]
    assert isinstance(agent, Agent)
    schemas = {tool.name: tool.schema()["function"] for tool in agent.behaviour.tools}
    assert set(schemas) == {"get_weather", "find_order"}
    weather = schemas["get_weather"]
    assert weather["description"] == "Today's weather in a city."
    assert weather["parameters"]["required"] == ["city"]
    assert weather["parameters"]["properties"]["unit"]["enum"] == ["celsius", "fahrenheit"]
    assert schemas["find_order"]["parameters"]["properties"]["order_id"]["type"] == "integer"
    assert await scope["get_weather"].function(city="Paris") == "Sunny and 22 degrees in Paris."


def test_serve_says_a_bad_configuration_in_one_line_and_exits_2(config, capsys):
    """As `sub300 serve` does: no traceback for an error the user must fix."""
    from sub300 import serve

    assert serve(Agent(config=config), port=70000) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sub300: configuration error: server.port") and "70000" in err[0]
