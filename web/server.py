"""`sub300 serve`: the aiohttp server that shares one set of engines between callers.

Today it serves health and the OpenAI-compatible API over the embedded LLM;
browser (WebRTC) and phone (SIP) callers attach to the same engines.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from aiohttp import web

from agent.config import Config
from agent.engines import Engines, load_engines, warm_up

from .openai_api import add_openai_routes

log = logging.getLogger(__name__)
ENGINES_KEY = web.AppKey("engines", Engines)
STARTED_KEY = web.AppKey("started", float)


async def healthz(request: web.Request) -> web.Response:
    engines = request.app[ENGINES_KEY]
    return web.json_response({
        "status": "ok",
        "uptime_s": round(time.monotonic() - request.app[STARTED_KEY], 1),
        "engines": engines.describe(),
    })


def build_app(config: Config, engines: Engines) -> web.Application:
    app = web.Application(client_max_size=256 * 1024)
    app[ENGINES_KEY] = engines
    app[STARTED_KEY] = time.monotonic()
    app.router.add_get("/healthz", healthz)
    add_openai_routes(app, engines.llm, model_name=engines.llm.name, default_max_tokens=config.llm.max_tokens)

    async def close_engines(app: web.Application) -> None:
        await engines.aclose()

    app.on_cleanup.append(close_engines)
    return app


def serve(config: Config, progress: Callable[[str], None] = print) -> int:
    engines = load_engines(config, progress=progress)

    async def main() -> None:
        await warm_up(engines, config)
        app = build_app(config, engines)
        runner = web.AppRunner(app, handle_signals=True)
        await runner.setup()
        site = web.TCPSite(runner, config.server.host, config.server.port)
        await site.start()
        progress(f"serving on http://{config.server.host}:{config.server.port} "
                 f"(/healthz, /v1/chat/completions); engines: {engines.describe()}")
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0
