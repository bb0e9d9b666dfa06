"""Engines by name: the entry points of the installed distributions, one list for built-in and third-party engines.

Each stage has an entry-point group (Python packaging's entry points, read
with `importlib.metadata.entry_points`); an entry point's name is the engine
name a configuration selects (``stt.engine = "faster-whisper"``) and its
object is a factory ``Callable[[Config], Engine]`` returning an object that
implements the stage's protocol (models/protocols.py)::

    group          config key       protocol
    sub300.vad     vad.engine       VoiceActivityDetector
    sub300.stt     stt.engine       SpeechRecognizer
    sub300.llm     llm.engine       LanguageModel (ToolCallingModel for tools)
    sub300.tts     tts.engine       SpeechSynthesizer
    sub300.turn    turn.detector    TurnCompletionModel, or None (the VAD's fixed hangover)

sub300's own engines are registered the same way, in its ``pyproject.toml``
(``[project.entry-points."sub300.stt"] faster-whisper = "sub300.agent.engines:_whisper"``),
so a third-party package adds an engine by declaring an entry point in its
own ``pyproject.toml`` and being installed; nothing in sub300 changes.  The
entry points exist only once a distribution is installed (``pip install``,
``pip install -e .`` for a checkout): a checkout that was never installed has
no engine, and `engine_names` says so.

A plugin's engine-specific settings come from ``[<stage>.options]`` in the
configuration (a free-form table, ``config.stt.options`` in the factory);
the factory checks them and raises ``ValueError`` for a bad one.

The lookup is cached (one scan of the installed metadata per process);
`refresh` forgets it after a distribution was installed into a running
process (tests).
"""
from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

#: stage -> entry-point group
GROUPS: dict[str, str] = {"vad": "sub300.vad", "stt": "sub300.stt", "llm": "sub300.llm", "tts": "sub300.tts",
                          "turn": "sub300.turn"}
#: stage -> the configuration key that selects its engine
CONFIG_KEYS: dict[str, str] = {"vad": "vad.engine", "stt": "stt.engine", "llm": "llm.engine", "tts": "tts.engine",
                               "turn": "turn.detector"}


class PluginError(RuntimeError):
    """An engine's entry point could not be loaded (its package is missing, broken or names no factory)."""


@functools.cache
def installed(stage: str) -> dict[str, EntryPoint]:
    """The engines installed for ``stage``: name -> entry point (one per name: when two distributions
    register the same name, the first the metadata lists wins)."""
    found: dict[str, EntryPoint] = {}
    for point in entry_points(group=GROUPS[stage]):
        found.setdefault(point.name, point)
    return found


def engine_names(stage: str, first: str | None = None) -> list[str]:
    """The names ``stage`` may be configured with: ``first`` (the default) first, then by name.
    Raises `PluginError` when none is installed."""
    names = sorted(installed(stage), key=lambda name: (name != first, name))
    if not names:
        raise PluginError(f"no {stage.upper()} engine is installed (entry-point group {GROUPS[stage]} is empty): "
                          "sub300 itself must be installed (pip install -e . in a checkout) for its engines "
                          "to be registered")
    return names


def check_name(stage: str, name: str, default: str | None = None) -> str:
    """``name`` when an engine of that name is installed for ``stage``; ValueError listing the names otherwise."""
    names = engine_names(stage, default)
    if name not in names:
        raise ValueError(f"expected one of {', '.join(repr(n) for n in names)} (the installed {stage.upper()} "
                         f"engines: entry points {GROUPS[stage]})")
    return name


def is_builtin(stage: str, name: str) -> bool:
    """Whether engine ``name`` is one of sub300's own (registered by the ``sub300`` distribution)."""
    point = installed(stage).get(name)
    return point is not None and point.dist is not None and point.dist.name == "sub300"


def load_factory(stage: str, name: str) -> Callable[[Any], Any]:
    """The factory of engine ``name`` (imported now); `PluginError` naming the distribution when it fails."""
    point = installed(stage).get(name)
    if point is None:
        raise PluginError(f"{CONFIG_KEYS[stage]} = {name!r}: no such engine (installed: "
                          f"{', '.join(engine_names(stage))})")
    dist = point.dist.name if point.dist is not None else "an unknown distribution"
    try:
        factory = point.load()
    except Exception as error:   # ImportError, AttributeError, or the module's own failure
        raise PluginError(f"{CONFIG_KEYS[stage]} = {name!r}: the entry point {point.value!r} of the package "
                          f"{dist!r} failed to load: {type(error).__name__}: {error}") from error
    if not callable(factory):
        raise PluginError(f"{CONFIG_KEYS[stage]} = {name!r}: the entry point {point.value!r} of the package "
                          f"{dist!r} is not a factory (a callable taking the Config)")
    return factory


def refresh() -> None:
    """Forget the cached lookup (after installing a distribution into this process, or changing sys.path)."""
    importlib.invalidate_caches()
    installed.cache_clear()
