"""ICE servers from the configuration, and host candidates on loopback.

The same STUN/TURN list goes to aiortc and to the page, so both sides gather
the same kinds of candidate.  aioice never offers 127.0.0.1 as a host
candidate; on a machine (or network namespace) whose only interface is
loopback that leaves no candidate at all, so there — and only there — we
let it offer loopback.  That is what makes tests on 127.0.0.1 alone work.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer

from sub300.agent.config import WebRtcConfig

_original_get_host_addresses = aioice.ice.get_host_addresses


def _host_addresses_or_loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    addresses = _original_get_host_addresses(use_ipv4=use_ipv4, use_ipv6=use_ipv6)
    if not addresses and use_ipv4:
        return ["127.0.0.1"]
    return addresses


def allow_loopback_when_alone() -> None:
    """Process-wide and idempotent: aioice looks the function up at each gathering."""
    aioice.ice.get_host_addresses = _host_addresses_or_loopback


def ice_servers(config: WebRtcConfig, environ: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """In the browser's RTCIceServer shape.  The TURN secret goes to the page too:
    a browser cannot relay without it (use short-lived TURN credentials in production)."""
    environ = os.environ if environ is None else environ
    servers: list[dict[str, Any]] = []
    if config.stun_urls:
        servers.append({"urls": list(config.stun_urls)})
    if config.turn_urls:
        servers.append({
            "urls": list(config.turn_urls),
            "username": config.turn_username,
            "credential": environ.get(config.turn_credential_env, ""),
        })
    return servers


def rtc_configuration(config: WebRtcConfig, environ: Mapping[str, str] | None = None) -> RTCConfiguration:
    return RTCConfiguration(iceServers=[
        RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
        for s in ice_servers(config, environ)
    ])
