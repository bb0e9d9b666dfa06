"""Shared fixtures: the real engines with the bundled models, loaded once per test session."""
from __future__ import annotations

import pytest

from sub300.agent.config import Config, load_config


@pytest.fixture(scope="session")
def config() -> Config:
    """The default configuration (bundled models), ignoring the developer's environment."""
    return load_config(environ={})


@pytest.fixture(scope="session")
def engines(config):
    from sub300.agent.engines import load_engines

    return load_engines(config, progress=lambda m: None)
