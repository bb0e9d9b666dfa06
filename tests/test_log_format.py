"""Log lines (agent/log_format.py): JSON with the call, turn and key of the work that logged, through the
tasks a call starts; plain stays the default; the records' redaction masks both formats."""
from __future__ import annotations

import asyncio
import copy
import io
import json
import logging

import pytest

from sub300.agent.log_format import PLAIN_FORMAT, call_context, configure_logging, turn_context
from sub300.models.protocols import ModelError


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_context_of_the_task_that_logged(root_logging):
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    log = logging.getLogger("sub300.test")

    async def main():
        log.info("outside")
        with call_context("c1", "k1"):
            async def work():
                with turn_context(3):
                    log.info("in a task the call started")
            task = asyncio.create_task(work())
        log.info("after the block")
        await task

    asyncio.run(main())
    by_message = {line["message"]: line for line in lines(stream) if line["logger"] == "sub300.test"}
    outside, inside, after = (by_message[m] for m in ("outside", "in a task the call started", "after the block"))
    assert inside == {"time": inside["time"], "level": "INFO", "logger": "sub300.test",
                      "message": "in a task the call started", "call_id": "c1", "turn": 3, "key_id": "k1"}
    assert inside["time"].endswith("Z") and "call_id" not in outside and "call_id" not in after


def test_a_conversation_logs_its_turns_with_the_call(root_logging, config):
    """The call's context set where its tasks start covers the conversation's tasks (responder, replies)."""
    pytest.importorskip("looptime", reason="virtual time needs the test extra (looptime)")
    from sub300.testing.clock import loop_clock, run_virtual
    from sub300.testing.fakes import FakeLlm, FakeStt, FakeTts, fake_engines, speech
    from sub300.testing.scripted_caller import ScriptedCaller

    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)

    async def call():
        engines = fake_engines(stt=FakeStt("Hello there.", delay_s=0.1),
                               llm=FakeLlm(["Hi", "."], error=ModelError("llm down")),
                               tts=FakeTts(delay_s=0.05, ms_per_piece=300.0))
        caller = ScriptedCaller(engines, copy.deepcopy(config), clock=loop_clock())

        async def talk():
            try:
                for _ in range(2):
                    await caller.silence(0.5)
                    await caller.say(speech(1.0))
                    await caller.until_idle()
            finally:
                await caller.close()

        with call_context("c9", "k9"):
            task = asyncio.create_task(talk())
        await task

    run_virtual(call())
    turns = [line for line in lines(stream) if line["logger"] == "sub300.agent.responder"]
    assert [(t["level"], t["call_id"], t["key_id"], t["turn"]) for t in turns] == \
        [("ERROR", "c9", "k9", 1), ("INFO", "c9", "k9", 2)]


def test_plain_is_the_default_and_redaction_masks_both_formats(root_logging):
    pytest.importorskip("sub300.agent.records.redaction")
    for fmt in ("plain", "json"):
        stream = io.StringIO()
        handler = configure_logging("info", fmt, ["email"], stream=stream) if fmt == "json" else \
            configure_logging("info", redact_kinds=["email"], stream=stream)
        logging.getLogger("sub300.test").info("write to %s please", "jane.doe@example.com")
        text = stream.getvalue()
        assert "jane.doe@example.com" not in text and "write to" in text
        if fmt == "plain":
            assert handler.formatter is not None and handler.formatter._fmt == PLAIN_FORMAT
            assert not text.startswith("{")
        else:
            assert lines(stream)[-1]["message"].startswith("write to ")
    assert sum(1 for h in logging.getLogger().handlers if getattr(h, "_sub300_handler", False)) == 1


def test_unknown_format_or_level_is_an_error(root_logging):
    with pytest.raises(ValueError, match="plain or json"):
        configure_logging("info", "xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="level"):
        configure_logging("loud")
