"""The embedded LLM's usage on a real request: its counts are its tokenizer's (slow: the bundled SmolLM2)."""
from __future__ import annotations

import pytest

from sub300.models.llm_ct2 import CTranslate2ChatModel
from sub300.models.protocols import LlmUsage

QUESTION = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]


@pytest.mark.slow
async def test_the_embedded_llm_counts_its_tokenizers_ids(engines):
    llm = engines.llm
    if not isinstance(llm, CTranslate2ChatModel):
        pytest.skip(f"the configured LLM is {llm.name}, not the embedded CTranslate2 model")
    llm.pin_system_prompt(QUESTION[0]["content"])       # a cached static prompt still counts as prompt tokens
    prompt_ids = llm.encode_prompt(QUESTION)

    cut = LlmUsage()
    text = "".join([p async for p in llm.stream_chat(QUESTION, max_tokens=6, usage=cut)])
    assert (cut.prompt_tokens, cut.completion_tokens, cut.reported_by) == (len(prompt_ids), 6, "tokenizer")
    assert len(llm._tokenizer.encode(text, add_special_tokens=False).ids) == 6

    whole = LlmUsage()
    text = "".join([p async for p in llm.stream_chat(QUESTION, max_tokens=64, usage=whole)])
    ids = llm._tokenizer.encode(text, add_special_tokens=False).ids
    assert whole.prompt_tokens == len(prompt_ids)
    # the answer's ids and the end-of-sequence token the model sampled (it ended before max_tokens)
    assert len(ids) < 63 and whole.completion_tokens == len(ids) + 1

    closed = LlmUsage()
    stream = llm.stream_chat(QUESTION, max_tokens=64, usage=closed)
    first = [await anext(stream), await anext(stream)]
    await stream.aclose()                     # closed early: the tokens generated until then are counted
    assert closed.completion_tokens is not None and 2 <= closed.completion_tokens < whole.completion_tokens
    assert first
