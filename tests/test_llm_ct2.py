"""The embedded LLM: GGUF → CTranslate2 conversion, tokenizer, chat, streaming, cancellation."""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from sub300.models.bundled import smollm2_gguf
from sub300.models.chat_template import render_chat
from sub300.models.protocols import LanguageModel, ModelError, ModelUnavailable

ct2_mod = pytest.importorskip("sub300.models.gguf_to_ct2")
from sub300.models.gguf_to_ct2 import METADATA_FILE, ensure_ct2_from_gguf  # noqa: E402
from sub300.models.llm_ct2 import CTranslate2ChatModel, detokenizer  # noqa: E402

FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence in English."}]
COLORS = [{"role": "user", "content": "Name three colors."}]


def _gguf() -> Path:
    try:
        return smollm2_gguf()
    except ModelUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ct2cache")


@pytest.fixture(scope="session")
def converted(cache_dir) -> tuple[Path, float]:
    t0 = time.monotonic()
    path = ensure_ct2_from_gguf(_gguf(), cache_dir, progress=lambda msg: None)
    return path, time.monotonic() - t0


@pytest.fixture(scope="session")
def llm(converted) -> CTranslate2ChatModel:
    # One intra-op thread: other test processes share this CPU, and libgomp's
    # spinning makes 2 threads several times slower than 1 under contention.
    return CTranslate2ChatModel(converted[0], device="cpu", threads=1)


# ------------------------------------------------------------ conversion
@pytest.mark.slow
def test_conversion_is_cached(converted, cache_dir):
    path, first_seconds = converted
    for name in ("model.bin", "config.json", "vocabulary.json", "tokenizer.json", METADATA_FILE):
        assert (path / name).is_file(), name
    assert path.parent == cache_dir
    t0 = time.monotonic()
    again = ensure_ct2_from_gguf(_gguf(), cache_dir, progress=lambda msg: pytest.fail(msg))
    assert again == path
    assert time.monotonic() - t0 < 0.5 < first_seconds
    # nothing but the finished directory: no temp dirs left behind
    assert [p.name for p in cache_dir.iterdir()] == [path.name]


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    gguf_path = _gguf()

    def boom(src, out, *, quantization):
        (out / "model.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(ct2_mod, "convert_gguf", boom)
    with pytest.raises(KeyboardInterrupt):
        ensure_ct2_from_gguf(gguf_path, tmp_path, progress=lambda msg: None)
    assert list(tmp_path.iterdir()) == []


def test_missing_gguf_is_unavailable(tmp_path):
    with pytest.raises(ModelUnavailable):
        ensure_ct2_from_gguf(tmp_path / "nope.gguf", tmp_path)


# ------------------------------------------------------------- tokenizer
@pytest.mark.slow
def test_tokenizer_matches_gguf_vocab(llm):
    tok = llm._tokenizer
    for s in ["Hello world!", "Émilie naïve café — 東京 🙂", "  two  spaces\n\n\ttab", "pi is 3.14159"]:
        assert tok.decode(tok.encode(s, add_special_tokens=False).ids, skip_special_tokens=False) == s
    enc = tok.encode("<|im_start|>user\nhi<|im_end|>\n", add_special_tokens=False)
    assert enc.ids[0] == tok.token_to_id("<|im_start|>") == 1
    assert tok.token_to_id("<|im_end|>") == 2 and enc.ids[-2] == 2
    assert enc.tokens == ["<|im_start|>", "user", "Ċ", "hi", "<|im_end|>", "Ċ"]
    # SmolLM's pre-tokenizer splits digits one by one
    assert tok.encode("123", add_special_tokens=False).tokens == ["1", "2", "3"]


def test_chat_template_renders_chatml():
    text = render_chat(None, [{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ModelError):
        render_chat("{{ raise_exception('no') }}", [])


MULTIBYTE = "añ東🙂! Émilie naïve café — 東京"


def _byte_fallback_tokenizer():
    """A toy SentencePiece-style tokenizer: a few word pieces, every other character
    as its UTF-8 bytes (<0xE6> …), so that one character spans several ids."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {"<unk>": 0, "<|im_end|>": 1}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ("▁", "▁a", "▁caf", "▁na", "ve", "!"):
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<|im_end|>"])
    return tok


def test_detokenizer_holds_back_partial_utf8():
    tok = _byte_fallback_tokenizer()
    ids = tok.encode(MULTIBYTE, add_special_tokens=False).ids
    assert len(ids) > len(MULTIBYTE)  # multi-byte characters really are split over ids
    assert tok.decode(ids) == MULTIBYTE
    decode = detokenizer(tok)
    pieces = [decode(i) for i in ids]
    assert "".join(pieces) == MULTIBYTE
    assert all("\ufffd" not in p for p in pieces)
    assert pieces.count("") >= len(MULTIBYTE.encode()) - len(MULTIBYTE)  # held back until whole
    assert detokenizer(tok)(tok.token_to_id("<|im_end|>")) == ""  # special tokens are skipped


@pytest.mark.slow
def test_detokenizer_matches_decode_on_the_model_tokenizer(llm):
    tok = llm._tokenizer
    for text in [MULTIBYTE, "  two  spaces\n\n\ttab", "pi is 3.14159", "Hello world!"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        decode = detokenizer(tok)
        pieces = [decode(i) for i in ids]
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
        assert all("\ufffd" not in p for p in pieces)


# ------------------------------------------------------------------ chat
@pytest.mark.slow
async def test_answers_capital_of_france(llm):
    assert isinstance(llm, LanguageModel)
    assert str(llm.placement) == "cpu/float32"
    answer = "".join([p async for p in llm.stream_chat(FRANCE, max_tokens=24)])
    assert "Paris" in answer


@pytest.mark.slow
async def test_stream_concatenation_equals_complete(llm):
    pieces = [p async for p in llm.stream_chat(COLORS, max_tokens=24)]
    assert len(pieces) >= 3
    whole = await asyncio.to_thread(llm.complete, COLORS, max_tokens=24)
    assert "".join(pieces) == whole
    assert "<|im_end|>" not in whole


async def _wait_threads(baseline: int, timeout: float = 3.0) -> int:
    deadline = time.monotonic() + timeout
    while threading.active_count() > baseline and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return threading.active_count()


@pytest.mark.slow
async def test_cancel_stops_generation(llm):
    story = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]
    baseline = threading.active_count()
    got: list[str] = []
    third = asyncio.Event()

    async def consume():
        async for piece in llm.stream_chat(story, max_tokens=400):
            got.append(piece)
            if len(got) == 3:
                third.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(third.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _wait_threads(baseline) == baseline
    assert len(got) < 20  # stopped long before max_tokens

    # closing the iterator (consumer broke out of the loop) stops it too
    agen = llm.stream_chat(story, max_tokens=400)
    n = 0
    async for _ in agen:
        n += 1
        if n == 2:
            break
    await agen.aclose()
    assert await _wait_threads(baseline) == baseline
    # and the model still works afterwards
    assert "Paris" in "".join([p async for p in llm.stream_chat(FRANCE, max_tokens=24)])


# ------------------------------------------------------------- bad input
def test_bad_model_dir_is_unavailable(tmp_path):
    with pytest.raises(ModelUnavailable):
        CTranslate2ChatModel(tmp_path / "missing")
    with pytest.raises(ModelUnavailable):
        CTranslate2ChatModel(tmp_path)  # exists, but no model.bin
    (tmp_path / "model.bin").write_bytes(b"not a model")
    with pytest.raises(ModelUnavailable):
        CTranslate2ChatModel(tmp_path)  # no tokenizer.json
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelUnavailable):
        CTranslate2ChatModel(tmp_path, device="cpu")  # garbage files


@pytest.mark.slow
def test_long_history_is_trimmed_to_context(llm, monkeypatch):
    history = [{"role": "system", "content": "Be brief."}]
    for i in range(20):
        history += [{"role": "user", "content": f"Question number {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
    history.append({"role": "user", "content": "Last question?"})
    full = len(llm.encode_prompt(history))
    monkeypatch.setattr(llm, "context_length", full // 2)
    ids = llm._fit_prompt(history, max_tokens=16)
    assert len(ids) + 16 <= full // 2
    text = llm._tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nBe brief.") and "Last question?" in text
    assert "Question number 0?" not in text
    monkeypatch.setattr(llm, "context_length", 8)
    with pytest.raises(ModelError):
        llm._fit_prompt(history, max_tokens=16)


@pytest.mark.slow
def test_a_pinned_system_prompt_is_cached_and_greedy_answers_stay_token_for_token_identical(llm, monkeypatch):
    import sub300.models.llm_ct2 as llm_ct2

    monkeypatch.setattr(llm, "_pinned", {})            # the session's model: leave no pin behind
    monkeypatch.setattr(llm, "_static_prompts", ())
    monkeypatch.setattr(llm_ct2, "MAX_STATIC_PROMPTS", 2)
    system = "You are a helpful assistant. Answer the question briefly in plain English."
    chats = [[{"role": "system", "content": system}, {"role": "user", "content": q}]
             for q in ("What is the capital of France?", "Name three colors.")]
    chats.append(chats[0][:1] + [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                 {"role": "user", "content": "How many days are in a week?"}])
    before = [llm.complete(chat, max_tokens=24) for chat in chats]
    static_before = llm.scheduler.static_rounds
    assert llm.pin_system_prompt(system) and llm.pin_system_prompt(system)     # idempotent
    prefix = llm.static_prompt_for(llm.encode_prompt(chats[0]))
    assert prefix and all(llm.static_prompt_for(llm.encode_prompt(chat)) == prefix for chat in chats)
    assert llm._tokenizer.decode(list(prefix), skip_special_tokens=False).startswith(f"<|im_start|>system\n{system}")
    assert [llm.complete(chat, max_tokens=24) for chat in chats] == before
    assert llm.scheduler.static_rounds >= static_before + len(chats)
    # another system prompt is prefilled in full; the set is bounded
    assert llm.static_prompt_for(llm.encode_prompt([{"role": "system", "content": "Be brief."}] + chats[0][1:])) == ()
    assert llm.pin_system_prompt("Be brief.")
    assert not llm.pin_system_prompt("Be very brief.")
