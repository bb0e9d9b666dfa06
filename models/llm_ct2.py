"""Embedded chat LLM on CTranslate2 (implements models.protocols.LanguageModel).

Reads a CTranslate2 decoder model directory, as produced by
``models.gguf_to_ct2.ensure_ct2_from_gguf`` (``sub300_llm.json`` holds the
chat template and stop tokens) or by ``ct2-transformers-converter
--copy_files tokenizer.json tokenizer_config.json`` for bigger models.
Run time needs only ctranslate2, tokenizers and jinja2.

All generations of the process run in one scheduler thread, batched
continuously with deadline classes (models/llm_batching.py: how requests
join and leave a running batch on CTranslate2, flow control, preemption).
Token ids become text with ``tokenizers.decoders.DecodeStream``, which holds
back a piece until its UTF-8 is whole (byte-fallback and byte-level tokens).
Closing or cancelling a consumer stops its request at the next decoding step.

Cached system prompts (`pin_system_prompt`): the tokens of a chat up to the
first user message's text (the system message and the user header) are the
same on every turn of every call with that system prompt, so CTranslate2
keeps the decoder state after them (``static_prompt``, llm_batching.py) and
prefills only the rest: time to first token p50 158 → 99 ms on this CPU
(scripts/bench_llm_prefix.py).  CTranslate2 never evicts that cache (the
last issue measured 2.4 GB for 60 distinct prefixes), so only prompts the
application pins are cached, at most `MAX_STATIC_PROMPTS` of them; a
request with any other system prompt (the OpenAI-compatible endpoint takes
any) is prefilled in full.  The KV state of a call's history cannot be kept
between turns: CTranslate2 has "no KV caching except for fixed prompts" (its maintainer in
OpenNMT/CTranslate2#1409, pointing to #1210);
the static prompt is its only reusable state.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

from tokenizers.decoders import DecodeStream

from .chat_template import render_chat
from .device import Placement, select_placement
from .gguf_to_ct2 import METADATA_FILE, TOKENIZER_FILE
from .llm_batching import BatchRequest, BatchScheduler, collect, open_stream, sampling_options
from .protocols import ChatMessage, LlmUsage, ModelError, ModelUnavailable
from .scheduling import Urgency, WorkTicket

log = logging.getLogger(__name__)

_STOP_TOKEN_NAMES = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "</s>", "<end_of_turn>")

#: requests decoded together at most, when not configured: bounded by step time on a CPU, memory on a GPU
DEFAULT_MAX_BATCH = {"cpu": 8, "cuda": 32}
#: system prompts whose prefix state is cached at most (CTranslate2 never evicts its static-prompt cache)
MAX_STATIC_PROMPTS = 4
#: False: every prompt is prefilled in full, pinned or not (a switch for comparisons: scripts/bench_turns.py)
STATIC_PROMPTS = True
#: tokens a round's members may feed at its start: on a CPU a prefill costs ~1.3 ms a token (SmolLM2-135M)
DEFAULT_MAX_ROUND_TOKENS = {"cpu": 1536}


def detokenizer(tokenizer: Any) -> Callable[[int], str]:
    """Token id → the text it completes ("" while a UTF-8 character is still partial).

    The pieces join to ``tokenizer.decode(ids, skip_special_tokens=True)``, less
    a character left incomplete by the last id.
    """
    stream = DecodeStream(skip_special_tokens=True)

    def step(token_id: int) -> str:
        return stream.step(tokenizer, token_id) or ""

    return step


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):  # tokenizer_config.json AddedToken form
        return value.get("content")
    return value


def _load_metadata(model_dir: Path, tokenizer: Any) -> dict[str, Any]:
    meta_path = model_dir / METADATA_FILE
    if meta_path.is_file():
        return json.loads(meta_path.read_text())
    # A CT2 directory converted from a Hugging Face model with its tokenizer files copied.
    meta: dict[str, Any] = {"model_name": model_dir.name}
    tc_path = model_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
    ct2_config_path = model_dir / "config.json"
    ct2_config = json.loads(ct2_config_path.read_text()) if ct2_config_path.is_file() else {}
    template = tc.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja_file = model_dir / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text()
    meta["chat_template"] = template
    meta["bos_token"] = _token_content(tc.get("bos_token")) or ct2_config.get("bos_token")
    meta["eos_token"] = _token_content(tc.get("eos_token")) or ct2_config.get("eos_token")
    meta["add_bos_token"] = bool(tc.get("add_bos_token", False))
    for key in ("bos", "eos"):
        tok = meta[f"{key}_token"]
        meta[f"{key}_token_id"] = tokenizer.token_to_id(tok) if tok else None
    meta["context_length"] = tc.get("model_max_length") if isinstance(tc.get("model_max_length"), int) and tc["model_max_length"] < 10**7 else None
    return meta


class CTranslate2ChatModel:
    """A chat model on CTranslate2, streamed token by token."""

    def __init__(self, model_dir: Path, *, device: str = "auto", compute_type: str = "auto", threads: int = 0,
                 max_batch: int = 0):
        model_dir = Path(model_dir)
        if not (model_dir / "model.bin").is_file():
            raise ModelUnavailable(f"no CTranslate2 model (model.bin) in {model_dir}")
        if not (model_dir / TOKENIZER_FILE).is_file():
            raise ModelUnavailable(f"no {TOKENIZER_FILE} in {model_dir}; the LLM needs its tokenizer")
        try:
            import ctranslate2
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - both are hard dependencies
            raise ModelUnavailable(f"CTranslate2 LLM needs ctranslate2 and tokenizers: {exc}") from exc

        self.model_dir = model_dir
        try:
            self._tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
            self._meta = _load_metadata(model_dir, self._tokenizer)
        except Exception as exc:
            raise ModelUnavailable(f"cannot read the tokenizer/metadata in {model_dir}: {exc}") from exc
        self.name = f"ct2:{self._meta.get('model_name') or model_dir.name}"
        self.placement: Placement = select_placement(
            self.name, device, compute_type, cpu_default="float32"
        )
        self.threads = threads or os.cpu_count() or 1
        t0 = time.monotonic()
        try:
            self._generator = ctranslate2.Generator(
                str(model_dir),
                device=self.placement.device,
                compute_type=self.placement.compute_type,
                intra_threads=self.threads,
                inter_threads=1,
            )
        except Exception as exc:
            raise ModelUnavailable(f"CTranslate2 could not load {model_dir} on {self.placement}: {exc}") from exc
        log.info("%s loaded on %s in %.2f s", self.name, self.placement, time.monotonic() - t0)

        stop_ids = set(self._meta.get("stop_token_ids") or [])
        if self._meta.get("eos_token_id") is not None:
            stop_ids.add(int(self._meta["eos_token_id"]))
        for tok in _STOP_TOKEN_NAMES:
            tid = self._tokenizer.token_to_id(tok)
            if tid is not None:
                stop_ids.add(tid)
        self._stop_ids = frozenset(stop_ids)
        self._end_tokens: list[str] = [t for t in map(self._tokenizer.id_to_token, sorted(self._stop_ids)) if t]
        self.context_length: int | None = self._meta.get("context_length")
        self.max_batch = max_batch or DEFAULT_MAX_BATCH.get(self.placement.device, 8)
        self.scheduler = BatchScheduler(
            self._generator, name=self.name, tokens_of=self._tokens_of, end_tokens=self._end_tokens,
            stop_ids=self._stop_ids, max_batch=self.max_batch,
            yield_to_critical_path=self.placement.device == "cpu",   # the cores are shared with STT and TTS
            max_round_tokens=DEFAULT_MAX_ROUND_TOKENS.get(self.placement.device, 1 << 30),
        )
        log.info("%s: continuous batching, at most %d requests per decoding step", self.name, self.max_batch)
        #: cached prefixes (token ids), longest first: see `pin_system_prompt`
        self._static_prompts: tuple[tuple[int, ...], ...] = ()
        self._pinned: dict[str, tuple[int, ...]] = {}

    def pin_system_prompt(self, system_prompt: str) -> bool:
        """Cache the decoder state of chats that begin with ``system_prompt`` (idempotent).

        The prefix is the tokens two chats with this system message and different user texts
        have in common (so the template's own joins are respected).  False, with a warning, when
        `MAX_STATIC_PROMPTS` are pinned already or the template gives no common prefix.
        """
        if system_prompt in self._pinned:
            return True
        if len(self._pinned) >= MAX_STATIC_PROMPTS:
            log.warning("%s: %d system prompts are cached already; this one is prefilled on every turn",
                        self.name, MAX_STATIC_PROMPTS)
            return False
        first, second = (self.encode_prompt([{"role": "system", "content": system_prompt},
                                             {"role": "user", "content": text}]) for text in ("a", "b"))
        common = 0
        while common < min(len(first), len(second)) and first[common] == second[common]:
            common += 1
        if common < 2:
            log.warning("%s: the chat template gives no common prefix for the system prompt; not cached", self.name)
            return False
        prefix = tuple(first[:common])
        self._pinned[system_prompt] = prefix
        self._static_prompts = tuple(sorted(set(self._pinned.values()), key=len, reverse=True))
        log.info("%s: the system prompt's first %d tokens are cached (static prompt)", self.name, common)
        return True

    def static_prompt_for(self, prompt_ids: list[int]) -> tuple[int, ...]:
        """The longest pinned prefix that ``prompt_ids`` begins with and goes on after; () if none."""
        if not STATIC_PROMPTS:
            return ()
        for prefix in self._static_prompts:
            if len(prompt_ids) > len(prefix) and tuple(prompt_ids[:len(prefix)]) == prefix:
                return prefix
        return ()

    @property
    def waiting(self) -> int:
        """Requests waiting outside the running batch (for metrics)."""
        return self.scheduler.waiting

    def _tokens_of(self, ids: list[int]) -> list[str]:
        tokens = [self._tokenizer.id_to_token(i) for i in ids]
        if None in tokens:
            raise ModelError(f"{self.name}: token id outside the vocabulary in {ids!r}")
        return tokens  # type: ignore[return-value]

    async def aclose(self) -> None:
        """Stop the batching thread (requests still running end with a ModelError)."""
        await asyncio.to_thread(self.scheduler.close)

    @property
    def device(self) -> str:
        return str(self.placement)

    # ------------------------------------------------------------ prompt
    def render_prompt(self, messages: Sequence[ChatMessage]) -> str:
        return render_chat(
            self._meta.get("chat_template"),
            messages,
            add_generation_prompt=True,
            bos_token=self._meta.get("bos_token"),
            eos_token=self._meta.get("eos_token"),
        )

    def encode_prompt(self, messages: Sequence[ChatMessage]) -> list[int]:
        ids = self._tokenizer.encode(self.render_prompt(messages), add_special_tokens=False).ids
        bos = self._meta.get("bos_token_id")
        if self._meta.get("add_bos_token") and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def _fit_prompt(self, messages: Sequence[ChatMessage], max_tokens: int) -> list[int]:
        """Encode, dropping the oldest non-system turns if the context would overflow."""
        msgs = list(messages)
        ids = self.encode_prompt(msgs)
        limit = self.context_length
        if not limit:
            return ids
        while len(ids) + max_tokens > limit:
            drop = next((i for i, m in enumerate(msgs[:-1]) if m.get("role") != "system"), None)
            if drop is None:
                raise ModelError(
                    f"prompt of {len(ids)} tokens + max_tokens {max_tokens} exceeds the "
                    f"{limit}-token context of {self.name}"
                )
            del msgs[drop]
            ids = self.encode_prompt(msgs)
        return ids

    # -------------------------------------------------------- generation
    def _request(self, prompt_ids: list[int], max_tokens: int, temperature: float, ticket: WorkTicket | None,
                 deliver: Callable[[object], None]) -> BatchRequest:
        return BatchRequest(prompt_ids=prompt_ids, max_tokens=max_tokens, sampling=sampling_options(temperature),
                            ticket=ticket or WorkTicket(Urgency.COMMITTED, label="llm"),
                            decode=detokenizer(self._tokenizer), deliver=deliver, auto_slack=ticket is None,
                            static_prompt=self.static_prompt_for(prompt_ids))

    def complete(self, messages: Sequence[ChatMessage], *, max_tokens: int, temperature: float = 0.0,
                 ticket: WorkTicket | None = None) -> str:
        """Blocking, non-streamed answer (the same batched path as ``stream_chat``); not on the event loop."""
        if max_tokens < 1:
            return ""
        prompt_ids = self._fit_prompt(messages, max_tokens)
        return collect(self.scheduler, lambda deliver: self._request(prompt_ids, max_tokens, temperature, ticket,
                                                                        deliver))

    async def stream_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        ticket: WorkTicket | None = None,
        usage: LlmUsage | None = None,
    ) -> AsyncGenerator[str, None]:
        """``usage`` (models/protocols.py): the tokenizer's counts, ``reported_by="tokenizer"``: the
        prompt ids as fed (after `_fit_prompt` dropped old turns; a cached static prompt counts, the
        request used it) and the ids generated, a sampled stop token included; a re-prefill when a
        round restarts (llm_batching.py) is the engine's cost, not the request's, and is not counted."""
        if max_tokens < 1:
            return
        try:
            prompt_ids = self._fit_prompt(messages, max_tokens)
        except ModelError:
            raise
        except Exception as exc:  # a tokenizer failure is this engine's failure too (a failed turn, not a crash)
            raise ModelError(f"{self.name} cannot encode the prompt: {exc}") from exc

        made: list[BatchRequest] = []

        def make(deliver: Callable[[object], None]) -> BatchRequest:
            made.append(self._request(prompt_ids, max_tokens, temperature, ticket, deliver))
            return made[0]

        pieces = open_stream(self.scheduler, make)
        if usage is not None:
            usage.prompt_tokens, usage.completion_tokens, usage.reported_by = len(prompt_ids), 0, "tokenizer"
        try:
            async with aclosing(pieces):
                async for piece in pieces:
                    if usage is not None:
                        usage.completion_tokens = made[0].completion_tokens
                    yield piece
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"{self.name} generation failed: {exc}") from exc
        finally:
            if usage is not None:   # closed: the scheduler thread has stopped this request (cancel, under its lock)
                usage.completion_tokens = made[0].completion_tokens
