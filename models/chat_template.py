"""Render a model's Jinja chat template (as Hugging Face's apply_chat_template does).

The template comes from the GGUF metadata (``tokenizer.chat_template``) or a
``tokenizer_config.json``.  Rendering happens in Jinja's immutable sandbox
with the same options transformers uses (trim_blocks, lstrip_blocks), so
templates written for transformers render the same text here.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from .protocols import ModelError

#: Used when a model ships no template: ChatML, which SmolLM2/Qwen-style models use.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise_exception(message: str) -> None:
    raise ModelError(f"chat template error: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise ModelError(f"invalid chat template: {exc}") from exc


def render_chat(
    template: str | None,
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **extra: Any,
) -> str:
    """The prompt text for ``messages`` (each a ``{"role", "content"}`` mapping)."""
    from jinja2.exceptions import TemplateError

    compiled = _compile(template or CHATML_TEMPLATE)
    msgs = []
    for m in messages:
        if "role" not in m or "content" not in m:
            raise ModelError(f"chat message needs 'role' and 'content': {dict(m)!r}")
        msgs.append({k: ("" if v is None else v) for k, v in m.items()})
    try:
        return compiled.render(
            messages=msgs,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            **extra,
        )
    except ModelError:
        raise
    except TemplateError as exc:
        raise ModelError(f"rendering the chat template failed: {exc}") from exc
