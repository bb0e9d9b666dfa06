"""`sub300 serve`: the aiohttp server that shares one set of engines between callers.

Routes: the latency demo page (`/`, `/static/…`), WebRTC signalling
(`POST /offer`, `GET /webrtc/config`), `/livez` (liveness: the process
answers; nothing else is looked at, so a busy or draining server is not
restarted), `/healthz` (liveness too, with a description of the engines,
calls and admission), `/readyz` (readiness: 200 only when every configured
listener is bound — `Readiness`; the engines are warmed before the HTTP
listener binds — and a new call would be admitted; 503 with the reason
otherwise: "starting: …", "draining", "full: …", "saturated: …"), `/metrics`
(Prometheus) and the OpenAI-compatible API over the embedded LLM.  Browser
(WebRTC) and, when enabled, phone (SIP) callers use the same engines, report
to the same metrics observer and count against the same `Admission`.

Roles (``server.role``, issue 13): ``all`` serves everything above and the
audio routes (web/audio_api.py); ``model`` serves the engines to media nodes
— ``/v1/chat/completions``, ``/v1/models``, ``/v1/audio/transcriptions``,
``/v1/audio/speech``, ``POST /v1/requests/{id}/urgency`` (web/request_urgency.py)
— with /metrics, /livez, /healthz, /readyz, and no
page, no ``/offer``, no ``/webrtc/config`` (404); ``media`` takes calls (the
page, signalling, the WebSocket media routes ``/ws/twilio`` and ``/ws/pcm`` of
web/websocket.py; SIP in `sub300 serve`) and serves no /v1 model route.
Model requests in flight are counted (`ModelRequests`, for the drain); while
the server drains a new one is answered 503 with ``Retry-After``.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from sub300.agent.admission import Admission
from sub300.agent.behaviour import DEFAULT_BEHAVIOUR, Behaviour
from sub300.agent.config import Config
from sub300.agent.engines import Engines
from sub300.agent.metrics import CONTENT_TYPE, MetricsObserver

from .audio_api import add_audio_routes
from .openai_api import add_openai_routes
from .request_urgency import add_request_routes
from .signalling import Signalling, describe_calls
from .websocket import WS_CALLS_KEY, add_websocket_routes

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
ENGINES_KEY = web.AppKey("engines", Engines)
#: the user's agent (agent/behaviour.py) that every call of this app gets, whatever its transport
BEHAVIOUR_KEY = web.AppKey("behaviour", Behaviour)
STARTED_KEY = web.AppKey("started", float)
METRICS_KEY = web.AppKey("metrics", MetricsObserver)
SIGNALLING_KEY = web.AppKey("signalling", Signalling)
ADMISSION_KEY = web.AppKey("admission", Admission)


class Readiness:
    """The listeners a process still waits for before it takes calls (``waiting``: names such as "sip").

    `sub300 serve` creates it with the listeners it will start after HTTP and calls `bound(name)` as
    each one is up; an app built without one (tests) is ready at once."""

    def __init__(self, waiting: tuple[str, ...] | list[str] = ()) -> None:
        self.waiting = set(waiting)

    def bound(self, name: str) -> None:
        self.waiting.discard(name)


READINESS_KEY = web.AppKey("readiness", Readiness)
#: the POST routes that run a model (counted, and refused while draining)
MODEL_ROUTES = ("/v1/chat/completions", "/v1/audio/transcriptions", "/v1/audio/speech")
#: seconds a draining server asks a model client to wait (it should try another node: a balancer's job)
DRAIN_RETRY_AFTER_S = 1


class ModelRequests:
    """The model requests in flight (`MODEL_ROUTES`), as the drain (sub300/drain.py) sees them: a `CallSet`
    whose "calls" each finish their answer; the drain waits for them up to ``server.drain_timeout_s``."""

    name = "model API"

    def __init__(self) -> None:
        self.active = 0

    def active_calls(self) -> int:
        return self.active

    def end_politely(self, goodbye: str) -> None:
        """Nothing to say: each request finishes its answer (new ones are refused)."""

    async def end_now(self, reason: str) -> None:
        """Nothing to do here: the web app's cleanup closes the connections left."""


MODEL_REQUESTS_KEY = web.AppKey("model_requests", ModelRequests)


@web.middleware
async def model_requests_middleware(request: web.Request,
                                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                                    ) -> web.StreamResponse:
    """Count model requests in flight; refuse new ones with 503 + ``Retry-After`` while draining."""
    if request.method != "POST" or request.path not in MODEL_ROUTES:
        return await handler(request)
    if request.app[ADMISSION_KEY].draining:
        log.info("%s refused: draining", request.path)
        return web.json_response(
            {"error": {"message": "draining: this server is shutting down, try again (another server)",
                       "type": "server_error", "param": None, "code": "draining"}},
            status=503, headers={"Retry-After": str(DRAIN_RETRY_AFTER_S)})
    counter = request.app[MODEL_REQUESTS_KEY]
    counter.active += 1
    try:
        return await handler(request)
    finally:
        counter.active -= 1


async def livez(request: web.Request) -> web.Response:
    """200 while the process answers: what a liveness probe (and Docker's HEALTHCHECK) asks."""
    return web.json_response({"status": "ok"})


async def healthz(request: web.Request) -> web.Response:
    engines = request.app[ENGINES_KEY]
    return web.json_response({
        "status": "ok",
        "uptime_s": round(time.monotonic() - request.app[STARTED_KEY], 1),
        "engines": engines.describe(),
        "calls": describe_calls(request.app[SIGNALLING_KEY])
        + (request.app[WS_CALLS_KEY].describe() if WS_CALLS_KEY in request.app else []),
        "admission": request.app[ADMISSION_KEY].describe(),
    })


async def readyz(request: web.Request) -> web.Response:
    """200 ``{"ready": true, ...}`` while every listener is bound and a new call would be admitted; 503
    ``{"ready": false, "reason": ...}`` while a listener is not bound yet ("starting: waiting for sip"), when
    the server drains ("draining") or the admission is full or its queue-wait guard refuses
    (agent/admission.py `Admission.describe`)."""
    state = request.app[ADMISSION_KEY].describe()
    waiting = request.app[READINESS_KEY].waiting
    if waiting and state.get("reason") != "draining":
        state.update(ready=False, reason=f"starting: waiting for {', '.join(sorted(waiting))}")
    return web.json_response(state, status=200 if state["ready"] else 503)


async def metrics(request: web.Request) -> web.Response:
    # prometheus' content type carries its own charset and version parameters
    response = web.Response(body=request.app[METRICS_KEY].render())
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def build_app(config: Config, engines: Engines, observer: MetricsObserver | None = None,
              admission: Admission | None = None, readiness: Readiness | None = None,
              behaviour: Behaviour = DEFAULT_BEHAVIOUR) -> web.Application:
    """The web app for ``config.server.role`` (see the module docstring). ``admission``: the process's, shared
    with SIP (`sub300 serve`); without one, the app makes its own from ``config`` (device: where ``engines``'
    STT runs). ``observer`` is made to watch it. ``readiness``: the listeners still to bind (`sub300 serve`);
    without one, /readyz follows the admission."""
    role = config.server.role
    app = web.Application(client_max_size=256 * 1024, middlewares=[model_requests_middleware])
    if admission is None:
        admission = Admission.from_config(config, device=engines.stt.device.split("/")[0])
    observer = observer or MetricsObserver(config.budget_ms)
    if observer.admission is None:
        observer.watch(admission)
    elif observer.admission is not admission:
        raise ValueError("build_app: the metrics observer watches another admission than the app's")
    observer.watch_engines(engines)
    signalling = Signalling(config, engines, observer, admission, behaviour)
    app[ENGINES_KEY] = engines
    app[BEHAVIOUR_KEY] = behaviour
    app[STARTED_KEY] = time.monotonic()
    app[METRICS_KEY] = observer
    app[SIGNALLING_KEY] = signalling
    app[ADMISSION_KEY] = admission
    app[READINESS_KEY] = readiness or Readiness()
    app[MODEL_REQUESTS_KEY] = ModelRequests()
    if role != "model":
        app.router.add_get("/", index)
        app.router.add_static("/static/", STATIC_DIR)
    app.router.add_get("/livez", livez)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    if role != "model":
        signalling.add_routes(app)
        add_websocket_routes(app, config, engines, signalling, admission, behaviour)   # /ws/twilio, /ws/pcm
    if role != "media":
        add_openai_routes(app, engines.llm, model_name=engines.llm.name, default_max_tokens=config.llm.max_tokens,
                          max_tokens_cap=config.llm.api_max_tokens)
        add_audio_routes(app, engines.stt, engines.tts, language=config.stt.language or None,
                         max_upload_bytes=config.server.audio_max_upload_bytes,
                         max_audio_s=config.server.audio_max_seconds,
                         max_speech_chars=config.server.speech_max_chars)
        add_request_routes(app)   # POST /v1/requests/{id}/urgency: a media node's promotions follow its requests

    async def close_engines(app: web.Application) -> None:
        await engines.aclose()

    app.on_cleanup.append(close_engines)
    return app
