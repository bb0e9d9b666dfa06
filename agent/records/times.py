"""Times as an operator writes them (``-7d``, ISO 8601, epoch seconds) → Unix epoch seconds."""
from __future__ import annotations

import re
import time
from datetime import UTC, datetime

from ..config import ConfigError

RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}


def parse_time(value: str | None, now: float | None = None) -> float | None:
    """Epoch seconds from ``-7d`` / ``-12h`` / ``-30m`` (before now), an ISO 8601 date or time (UTC when no
    offset is given) or epoch seconds; None for None. Raises ConfigError for anything else."""
    if value is None or value == "":
        return None
    now = time.time() if now is None else now
    m = RELATIVE.match(value.strip())
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"{value!r} is not a time: use -7d, -12h, 2026-11-30, 2026-11-30T12:00:00+00:00 "
                          "or epoch seconds") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
