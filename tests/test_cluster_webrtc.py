"""WebRTC across nodes: aiortc callers → nginx (scripts/nginx/sub300.conf) → two sub300 web apps, on loopback.

nginx (Debian's nginx-light) runs with the repository's sub300.conf as it is, but for its ``listen`` line
(a free port of 127.0.0.1), and a node list written here (the layout of scripts/nginx/sub300-nodes.conf);
started with a prefix of the test's own and stopped by PID.  The two apps are `build_app` in this process
on 127.0.0.1, with the real engines.

* Offers spread over both nodes (round robin); each call's media flows both ways straight between the
  caller and its node (nginx carries no UDP: ICE candidates are the node's own).
* A request that names a call reaches the node that answered it, by the sub300_node cookie the /offer
  response set, or by the X-Sub300-Node header.  The route here is a stand-in for the admin route
  /v1/calls/{id} (web/admin.py, which needs a records store): it answers 200 only on the node that holds
  the call, so a misrouted request is a 404.
* One node drains (sub300/drain.py's sequence): its calls end politely; new offers all go to the other
  node — nginx retries the drained node's 503 there (at most one such retry, then the node is skipped for
  fail_timeout), and no caller sees a refusal.
* /metrics is per node, not proxied.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from sub300.agent.admission import Admission
from sub300.agent.config import ServerConfig
from sub300.drain import Drain, WebRtcCalls
from sub300.testing.aiortc_caller import AiortcCaller
from sub300.web.server import SIGNALLING_KEY, build_app

from .test_sip_support import Peer

pytestmark = pytest.mark.slow
NGINX_DIR = Path(__file__).resolve().parent.parent / "scripts" / "nginx"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


@pytest.fixture(scope="module")
def nginx_binary() -> str:
    if NGINX is None:
        if os.geteuid() != 0:
            pytest.skip("nginx missing (Debian: apt-get install nginx-light; scripts/setup.sh does it)")
        pytest.fail("nginx missing: apt-get install -y nginx-light (scripts/setup.sh --test-deps installs it)")
    return NGINX


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One sub300 web app on 127.0.0.1 with its own admission, drain, and the stand-in call route."""

    def __init__(self, name: str, config, engines) -> None:
        self.name = name
        self.admission = Admission.per_transport("webrtc", 8)
        self.refused: list[str] = []
        self.admission.on_refusal.append(lambda transport, refusal: self.refused.append(refusal.reason))
        self.app = build_app(config, engines, admission=self.admission)
        self.app.router.add_get("/v1/calls/{call_id}", self._whose)
        self.server = TestServer(self.app, host="127.0.0.1")
        self.drain = Drain(self.admission, timeout_s=60, goodbye=ServerConfig().drain_goodbye)

    @property
    def signalling(self):
        return self.app[SIGNALLING_KEY]

    async def _whose(self, request: web.Request) -> web.Response:
        call_id = request.match_info["call_id"]
        status = 200 if call_id in self.signalling.calls else 404
        return web.json_response({"node": self.name, "call_id": call_id}, status=status)

    async def start(self) -> None:
        await self.server.start_server()
        self.drain.calls.append(WebRtcCalls(self.signalling))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"


def nginx_config(tmp: Path, port: int, nodes: list[Node]) -> Path:
    """The repository's sub300.conf on ``port``, this test's node list, and a main file for a private prefix."""
    conf = (NGINX_DIR / "sub300.conf").read_text()
    assert conf.count("    listen 80;\n") == 1
    (tmp / "sub300.conf").write_text(conf.replace("    listen 80;\n", f"    listen 127.0.0.1:{port};\n"))
    servers = "".join(f"    server {n.address} max_fails=1 fail_timeout=10s;\n" for n in nodes)
    pinned = "".join(f"upstream sub300_{n.name} {{ server {n.address}; }}\n" for n in nodes)
    by_addr = "".join(f'    "~(^|, ){n.address.replace(".", chr(92) + ".")}$"  {n.name};\n' for n in nodes)
    by_name = "".join(f"    {n.name}  sub300_{n.name};\n" for n in nodes)
    (tmp / "sub300-nodes.conf").write_text(
        f"upstream sub300_nodes {{\n{servers}}}\n{pinned}"
        f'map $upstream_addr $sub300_answered_by {{\n{by_addr}    default "";\n}}\n'
        f"map $sub300_pin $sub300_pinned {{\n{by_name}    default sub300_nodes;\n}}\n")
    temp = "".join(f"  {kind}_temp_path {tmp / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                         "scgi"))
    main = tmp / "nginx.conf"
    main.write_text(("user root;\n" if os.geteuid() == 0 else "") +   # workers must reach the private temp paths
                    f"worker_processes 1;\npid {tmp / 'nginx.pid'};\nevents {{ worker_connections 256; }}\n"
                    f"http {{\n  access_log {tmp / 'access.log'};\n{temp}"
                    f"  include {tmp / 'sub300-nodes.conf'};\n  include {tmp / 'sub300.conf'};\n}}\n")
    return main


async def _wait_tcp(port: int, peer: Peer, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        if peer.proc.poll() is not None:
            break
        await asyncio.sleep(0.05)
    raise AssertionError(f"nginx does not listen on {port}: {peer.tail()}")


async def _until(predicate, timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def test_nginx_spreads_offers_pins_follow_ups_and_skips_a_drained_node(config, engines, nginx_binary,
                                                                             tmp_path):
    nodes = [Node("media1", config, engines), Node("media2", config, engines)]
    async with contextlib.AsyncExitStack() as stack:
        for node in nodes:
            await node.start()
            stack.push_async_callback(node.server.close)
        port = _free_tcp_port()
        main = nginx_config(tmp_path, port, nodes)
        nginx = Peer([nginx_binary, "-p", str(tmp_path), "-c", str(main), "-e", "stderr", "-g", "daemon off;"],
                     log_path=str(tmp_path / "nginx.log"))
        stack.callback(nginx.stop)
        await _wait_tcp(port, nginx)
        url = f"http://127.0.0.1:{port}"
        plain = await stack.enter_async_context(aiohttp.ClientSession())

        async def place_call() -> tuple[AiortcCaller, Node]:
            # a browser's cookie jar (unsafe=True: aiohttp keeps no cookie of an IP-address host otherwise)
            session = await stack.enter_async_context(aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)))
            caller = AiortcCaller(url, session)
            stack.push_async_callback(caller.vanish)
            await caller.connect()
            (node,) = [n for n in nodes if caller.call_id in n.signalling.calls]
            pin = session.cookie_jar.filter_cookies(URL(url)).get("sub300_node")
            assert pin is not None and pin.value == node.name, nginx.tail()
            return caller, node

        # 1. four offers, one after another: round robin, two calls on each node, media both ways
        calls = [await place_call() for _ in range(4)]
        assert sorted(n.name for _, n in calls) == ["media1", "media1", "media2", "media2"]
        for caller, node in calls:
            server_call = node.signalling.calls[caller.call_id]
            await _until(lambda c=caller, s=server_call: c.received_frames > 0 and s.last_audio is not None, 20,
                         f"media both ways on call {caller.call_id}")
            # 2. follow-ups that name the call reach its node: by the cookie, and by the header
            async with caller.session.get(f"{url}/v1/calls/{caller.call_id}") as r:
                assert r.status == 200 and (await r.json())["node"] == node.name, await r.text()
                assert r.headers["X-Sub300-Node"] == node.name
            async with plain.get(f"{url}/v1/calls/{caller.call_id}", headers={"X-Sub300-Node": node.name}) as r:
                assert r.status == 200 and (await r.json())["node"] == node.name, await r.text()
        async with plain.get(f"{url}/metrics") as r:
            assert r.status == 404   # per node, not through the balancer

        # 3. media1 drains: its calls end politely; every new offer lands on media2, no caller sees a 503
        drained, other = nodes
        draining = asyncio.create_task(drained.drain.drain())
        after = [await place_call() for _ in range(3)]
        assert [n.name for _, n in after] == ["media2"] * 3
        assert drained.refused in ([], ["draining"]), drained.refused   # one 503 retried, then skipped
        assert await asyncio.wait_for(draining, 60) == "drained"
        assert not drained.signalling.calls
        assert len(other.signalling.calls) == 5   # its two calls in progress and the three new ones
        for caller, _ in calls + after:
            await caller.hang_up()
        await _until(lambda: not other.signalling.calls, 15, "the calls to end")
