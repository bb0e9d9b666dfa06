"""Tell systemd where the server stands: the sd_notify(3) protocol, for a ``Type=notify`` unit.

The protocol is one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket
named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace);
systemd sets it for the service's main process.  `sub300 serve` sends
``READY=1`` once every listener is bound (the same moment /readyz first says
ready) and ``STOPPING=1`` when the drain starts (scripts/systemd/sub300.service).
Outside systemd (no ``$NOTIFY_SOCKET``) it does nothing; a failed send is
logged, never raised: the server runs on without it.
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=serving"``) to the service manager; True when sent."""
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):   # the abstract namespace: a leading NUL byte
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError as error:
        log.warning("sd_notify %r to %s failed: %s", state.split("\n")[0], address.lstrip("\0"), error)
        return False
