"""Shared fixtures: the real engines with the bundled models, loaded once per test session."""
from __future__ import annotations

import logging
import os
import tempfile

import pytest

from sub300.agent.config import Config, load_config


def pytest_configure(config) -> None:
    """Records and keys of every server the tests start (`records.url` = '' → $XDG_STATE_HOME/sub300/records.db)
    go to a folder of this run's own, not the developer's ~/.local/state; removed with the OS's tmp."""
    os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="sub300-tests-state-")


@pytest.fixture
def root_logging():
    """For tests that call `configure_logging` (through `sub300.cli.main` too): the root logger is given back as
    it was, so no handler bound to this test's captured stderr outlives it ("I/O operation on closed file")."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def config() -> Config:
    """The default configuration (bundled models), ignoring the developer's environment."""
    return load_config(environ={})


@pytest.fixture(scope="session")
def engines(config):
    """The real engines on the bundled models, loaded once; closed at the end of the session, as
    `sub300 serve` closes them: the embedded LLM's batching thread must not be inside CTranslate2
    when the interpreter exits (that aborted pytest: 'terminate called without an active exception')."""
    import asyncio

    from sub300.agent.engines import load_engines

    loaded = load_engines(config, progress=lambda m: None)
    yield loaded
    asyncio.run(loaded.aclose())


def pytest_collection_modifyitems(config, items) -> None:
    """Two tiers: a test that uses the real engines is slow, whatever its module says.

    `pytest -m "not slow"` is then the fast tier (named fakes, virtual time,
    protocol tests): seconds, no model loaded.
    """
    for item in items:
        if "engines" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
