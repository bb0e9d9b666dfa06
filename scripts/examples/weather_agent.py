"""A weather line: one tool, served over WebRTC, SIP and the WebSocket transports at once.

    SUB300_LLM_BASE_URL=http://127.0.0.1:8000/v1 .venv/bin/python scripts/examples/weather_agent.py

No tool-calling model at hand?  `.venv/bin/python -m sub300.testing.fake_openai_tools` serves a FAKE one there.
"""
from typing import Annotated

from sub300 import Agent, function_tool, serve


@function_tool
async def get_weather(city: Annotated[str, "the city, e.g. Paris"]) -> str:
    """Today's weather in a city."""
    return f"Sunny and 22 degrees in {city}."


agent = Agent(instructions="You are a weather line. Answer in one short sentence.",
              tools=[get_weather], engines={"llm": "openai"})   # a model that calls tools (vLLM, a hosted API)


@agent.on("turn_ended")
def show(turn):
    print(f"{turn.transcript!r} -> {turn.reply!r} in {turn.ledger.voice_to_voice_ms:.0f} ms", flush=True)


if __name__ == "__main__":   # WebRTC: the page at /; phones: SIP and /ws/twilio; apps: /ws/pcm
    raise SystemExit(serve(agent, sip=True))
