"""sub300: a real-time voice agent server.

One import name for the whole program.  The folders of the source tree map
onto it (see ``pyproject.toml``)::

    sub300.models   model engines (VAD, STT, LLM, TTS) behind small Protocols
    sub300.agent    the transport-free conversation: turns, barge-in, ledger
    sub300.media    transports: WAV files, WebRTC (aiortc), SIP + RTP
    sub300.web      the aiohttp app: demo page, signalling, metrics, OpenAI API
    sub300.api      the Python API: ``Agent`` (instructions, tools, engines, hooks)
    sub300.hooks    hooks on conversation events (``@agent.on("turn_ended")``)
    sub300.server   ``serve``/``serve_async``/``Server``: the server ``sub300 serve`` runs
    sub300.cli      the ``sub300`` command
    sub300.testing  fakes, a virtual clock and scripted callers for tests

Imports point down only: ``models`` <- ``agent`` <- ``media``/``web`` <- ``api``/``server``/``cli``.

The public API, for a program that builds its own agent::

    from sub300 import Agent, function_tool, serve

The names below are imported on first use (PEP 562), so ``import sub300.models``
alone does not load the server.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {"Agent": "sub300.api", "serve": "sub300.server", "serve_async": "sub300.server",
            "Server": "sub300.server", "function_tool": "sub300.agent.tools", "Tool": "sub300.agent.tools",
            "Config": "sub300.agent.config", "load_config": "sub300.agent.config",
            "CallStarted": "sub300.hooks", "CallEnded": "sub300.hooks"}
__all__ = ["Agent", "CallEnded", "CallStarted", "Config", "Server", "Tool", "__version__", "function_tool",
           "load_config", "serve", "serve_async"]

if TYPE_CHECKING:
    from sub300.agent.config import Config, load_config
    from sub300.agent.tools import Tool, function_tool
    from sub300.api import Agent
    from sub300.hooks import CallEnded, CallStarted
    from sub300.server import Server, serve, serve_async


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sub300' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
