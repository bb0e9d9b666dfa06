"""Errors that stop a start, as one line and an exit status: the same for `sub300` and `serve()`.

A configuration error is the user's to fix (exit 2); a model, engine plugin
or tool set that cannot run is exit 3.  Anything else is a bug: it is not
one of these and keeps its traceback.
"""
from __future__ import annotations

from sub300.agent.config import ConfigError
from sub300.agent.plugins import PluginError
from sub300.agent.tools import ToolsUnsupported
from sub300.models.protocols import ModelError, ModelUnavailable

#: exit status of a bad input or configuration
EXIT_BAD_INPUT = 2
#: exit status of a model, engine plugin or tool set that cannot run
EXIT_MODEL = 3


def startup_failure(error: BaseException) -> tuple[int, str] | None:
    """``(exit status, one line for stderr)`` for an error that stops a start, else None."""
    if isinstance(error, ConfigError):
        return EXIT_BAD_INPUT, f"sub300: configuration error: {error}"
    if isinstance(error, ModelUnavailable):
        return EXIT_MODEL, f"sub300: model unavailable: {error}"
    if isinstance(error, PluginError):   # an engine plugin that does not import (agent/plugins.py)
        return EXIT_MODEL, f"sub300: engine plugin: {error}"
    if isinstance(error, ToolsUnsupported):
        return EXIT_MODEL, f"sub300: tools: {error}"
    if isinstance(error, ModelError):
        return EXIT_MODEL, f"sub300: model error: {error}"
    return None
