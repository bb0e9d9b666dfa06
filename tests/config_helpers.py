"""A quick way for tests to vary the configuration: ``configure(config, vad__hangover_ms=600)``."""
from __future__ import annotations

import copy
from typing import Any

from sub300.agent.config import Config


def configure(config: Config, **sections: Any) -> Config:
    """A deep copy of ``config`` with each ``SECTION__KEY=value`` set (attribute assignment, not validated)."""
    c = copy.deepcopy(config)
    for key, value in sections.items():
        section, _, name = key.partition("__")
        setattr(getattr(c, section), name, value)
    return c
