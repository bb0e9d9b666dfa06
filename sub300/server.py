"""Serving an agent: `serve` (``sub300 serve`` runs exactly this), `serve_async`, and `Server` for one's own loop.

The web app (page, WebRTC signalling, the WebSocket media routes /ws/twilio
and /ws/pcm, metrics, the OpenAI API: web/server.py) and, when enabled, the
SIP service share one set of engines
and one admission (a call counts against one capacity, whatever its
transport); every call gets the agent's `Behaviour` (instructions, tools)
and is watched by its hooks (sub300/hooks.py) beside the metrics, the
records and the traces.  ``server.role`` chooses what is served
(web/server.py): ``model`` starts no SIP listener and takes no call,
``media`` logs each stage's remote endpoint (a warning for a stage still in
process).

Start (`Server.start`): load the engines (in a worker thread) and warm them,
bind HTTP (/livez answers; /readyz says "starting" while SIP is not bound),
bind SIP, then ready (systemd's ``READY=1`` too).  Stop (`Server.stop`, or
SIGTERM/SIGINT when the server takes signals): the drain (sub300/drain.py)
-- /readyz 503 "draining", new calls 503, each call finishes its turn, hears
``server.drain_goodbye`` and is hung up, within ``server.drain_timeout_s``;
a second signal or the timeout ends the rest at once -- then the closers run
in order (SIP, the web app and the engines, the records or the key store,
the traces, the hooks) and the status is 0 (1 when a closer failed).

The shutdown is ordinary code on a live event loop.  It used to run inside
`asyncio.run`'s cancellation of every task (aiohttp's ``handle_signals``
raises `GracefulExit` out of the loop): aiortc's own tasks were cancelled
together with the calls' closing, its DTLS transport went "closed" and its
peer connection started a `close()` of its own that was cancelled half-way,
so `WebRtcCall`'s `pc.close()` waited forever on that close's future and the
process never exited (py-spy and a task dump, 2026-11-30).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from typing import Any

from sub300.agent.config import Config, override
from sub300.agent.log_format import configure_logging
from sub300.failures import startup_failure

from .api import Agent

log = logging.getLogger("sub300")
Progress = Callable[[str], None]
#: the signals a server that takes signals drains on (the first) and stops on (the second)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def serving_config(config: Config, *, host: str | None = None, port: int | None = None,
                   sip: bool | Mapping[str, Any] | None = None, role: str | None = None,
                   origin: str = "serve()") -> Config:
    """``config`` with what `serve` was given on top, checked like the file's values (`ConfigError`).

    ``sip``: True/False enables/disables the SIP listener; a mapping is ``[sip]`` settings (enabled
    unless it says otherwise).  ``port=0`` (any free port, tests) is set without the check, as
    agent/config.py allows programs to."""
    server: dict[str, Any] = {key: value for key, value in (("host", host), ("port", port), ("role", role))
                              if value is not None and not (key == "port" and value == 0)}
    values: dict[str, Any] = {"server": server} if server else {}
    if sip is not None:
        values["sip"] = {"enabled": sip} if isinstance(sip, bool) else {"enabled": True, **sip}
    checked = override(config, values, origin=origin) if values else config
    if port == 0:
        checked = checked.model_copy(deep=True)
        checked.server.port = 0
    return checked


def describe_role(config: Config) -> list[tuple[str, str]]:
    """What ``server.role`` means for this configuration: (level, line) pairs that `serve` logs.

    A media node names the remote endpoint of each model stage and warns (not fails) for a stage that
    still runs in process (its calls then share this machine's cores with it); a model node and an
    all-in-one server have nothing to add."""
    if config.server.role != "media":
        return []
    lines: list[tuple[str, str]] = []
    for stage, section in (("stt", config.stt), ("llm", config.llm), ("tts", config.tts)):
        if section.engine == "openai":
            lines.append(("info", f"media node: {stage.upper()} is remote: {section.base_url} "
                                  f"(model {section.remote_model!r})"))
        else:
            lines.append(("warning", f"media node: {stage.upper()} still runs in this process ({stage}.engine = "
                                     f"{section.engine!r}); set {stage}.engine = \"openai\" and {stage}.base_url "
                                     "to use a model node"))
    return lines


async def start_sip(config: Config, engines, observer, admission=None, auth_limits=None, behaviour=None):
    """The SIP service (media/sip), sharing engines, metrics, the admission, the per-source limits
    (``auth_limits``: web/auth.py's, so one INVITE rate per source) and the agent's behaviour; None when
    disabled or on a model node."""
    if not config.sip.enabled or config.server.role == "model":
        return None
    from sub300.agent.behaviour import DEFAULT_BEHAVIOUR
    from sub300.media.sip.service import start_sip_service

    return await start_sip_service(config, engines, observer, admission=admission, auth_limits=auth_limits,
                                   behaviour=behaviour or DEFAULT_BEHAVIOUR)


class Server:
    """One server for ``agent`` on the running event loop::

        async with Server(agent, port=0) as server:    # started: engines warm, listeners bound, ready
            print(server.url)                          # http://127.0.0.1:<the bound port>
            ...
        # left: drained and closed (server.status: 0, or 1 when a closer failed)

    or ``await server.start()`` … ``await server.stop()``; ``await server.wait()`` returns when a stop
    (`stop`, or a signal when ``handle_signals``) has drained and closed it.  ``host``, ``port``,
    ``sip``, ``role``: as `serving_config`.  ``handle_signals``: SIGTERM/SIGINT drain it (the first)
    and end the calls left at once (the next); only on the main thread's loop.  ``progress``: the
    start-up lines (default: the log)."""

    def __init__(self, agent: Agent | None = None, *, host: str | None = None, port: int | None = None,
                 sip: bool | Mapping[str, Any] | None = None, role: str | None = None,
                 progress: Progress | None = None, handle_signals: bool = False) -> None:
        self.agent = agent if agent is not None else Agent()
        self.config = serving_config(self.agent.config, host=host, port=port, sip=sip, role=role)
        self.progress: Progress = progress or (lambda line: log.info("%s", line))
        self.handle_signals = handle_signals
        self.drain: Any = None          # sub300.drain.Drain once started
        self.engines: Any = None        # sub300.agent.engines.Engines once loaded
        self.app: Any = None            # the aiohttp application once built
        self.sip: Any = None            # media/sip's SipService when SIP is on
        self.host = self.config.server.host
        self.port: int | None = None    # the bound HTTP port (port 0: the one the system chose)
        self.sip_port: int | None = None
        self.status: int | None = None
        self._done: asyncio.Task[int] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> Server:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> Server:
        """Load, warm, bind and become ready (see the module docstring); on a failure, what was started is
        closed and the error raised (`ConfigError`, `ModelError`, `OSError` for a port in use,
        `ToolsUnsupported` for tools on an LLM that cannot call them)."""
        from aiohttp import web

        from sub300.agent.admission import Admission
        from sub300.agent.calls import ObserverGroup
        from sub300.agent.engines import warm_up
        from sub300.agent.metrics import MetricsObserver
        from sub300.agent.records import open_store
        from sub300.agent.tools import check_tools
        from sub300.agent.tracing import TracingObserver, setup_tracing
        from sub300.cli_records import start_records
        from sub300.drain import Drain, SipCalls, WebRtcCalls
        from sub300.sd_notify import notify
        from sub300.web.auth import add_auth_routes
        from sub300.web.server import MODEL_REQUESTS_KEY, SIGNALLING_KEY, Readiness, build_app
        from sub300.web.websocket import WS_CALLS_KEY

        if self.drain is not None:
            raise RuntimeError("this server was started already")
        config, agent, progress = self.config, self.agent, self.progress
        role = config.server.role
        for level, line in describe_role(config):
            getattr(log, level)("%s", line)
        engines = self.engines = await asyncio.to_thread(agent.load_engines, config, progress)
        admission = Admission.from_config(config, device=engines.stt.device.split("/")[0])
        drain = self.drain = Drain(admission, timeout_s=config.server.drain_timeout_s,
                                   goodbye=config.server.drain_goodbye)
        if self.handle_signals:
            drain.install(asyncio.get_running_loop(), SIGNALS)
        drain.on_drain.append(lambda: notify("STOPPING=1\nSTATUS=draining"))
        drain.closers.append(("the engines", engines.aclose))   # replaced by the web app's cleanup below
        try:
            check_tools(engines.llm, agent.tools)
            await warm_up(engines, config)
            if drain.stopping:
                self._done = asyncio.get_running_loop().create_task(self._close(drain.close()))
                return self
            observer = MetricsObserver(config.budget_ms, admission=admission)
            readiness = Readiness(("sip",) if config.sip.enabled and role != "model" else ())
            app = self.app = build_app(config, engines, observer, admission, readiness, behaviour=agent.behaviour)
            # one database for the API keys (web/auth.py) and the records (agent/records); opened (and
            # migrated) off the loop.  Both add middleware or routes, so before runner.setup().
            store = await asyncio.to_thread(open_store, config)
            progress(f"records and API keys: {store.url}")
            auth = add_auth_routes(app, config, store)
            progress(auth.describe())
            records = await start_records(config, app, observer, store=store)
            watchers: list[Any] = [records.call_observer if records is not None else observer]
            tracer = setup_tracing(config)   # [telemetry].otlp_endpoint: a trace per call (agent/tracing.py)
            if tracer is not None:
                watchers.append(TracingObserver(tracer))
            if agent.hooks:
                watchers.append(agent.hooks)
            call_observer = watchers[0] if len(watchers) == 1 else ObserverGroup(watchers)
            app[SIGNALLING_KEY].observer = call_observer
            runner = web.AppRunner(app, handle_signals=False)
            await runner.setup()
            # the web app's cleanup closes every WebRTC call left and the engines (web/server.py)
            drain.closers[:] = [("the web app", runner.cleanup)]
            drain.calls.append(WebRtcCalls(app[SIGNALLING_KEY]))
            if WS_CALLS_KEY in app:   # /ws/twilio, /ws/pcm (not on a model node)
                drain.calls.append(app[WS_CALLS_KEY])
            drain.calls.append(app[MODEL_REQUESTS_KEY])   # model requests in flight finish their answer
            if records is not None:   # records: last, once every call ended: writes what is queued
                drain.closers.append(("the records", records.aclose))
            else:                     # the key store alone
                drain.closers.append(("the key store", functools.partial(asyncio.to_thread, store.close)))
            if tracer is not None:    # then the spans still queued go out (bounded by the exporter's timeout)
                drain.closers.append(("the traces", functools.partial(asyncio.to_thread, tracer.shutdown)))
            if agent.hooks:           # the calls' async hooks, once every call ended
                drain.closers.append(("the hooks", agent.hooks.aclose))
            site = web.TCPSite(runner, config.server.host, config.server.port)
            await site.start()
            self.port = int(runner.addresses[0][1])
            sip = self.sip = await start_sip(config, engines, call_observer, admission, auth_limits=auth.limits,
                                             behaviour=agent.behaviour)
            if sip is not None:
                drain.calls.append(SipCalls(sip))
                drain.closers.insert(0, ("SIP", sip.close))
                self.sip_port = int(sip.transport.address[1])
                readiness.bound("sip")
        except BaseException:
            await self._close(drain.close())
            raise
        routes = {"all": "/ demo page, /offer, /ws/twilio, /ws/pcm, /metrics, /livez, /readyz, /v1/chat/completions, "
                         "/v1/audio/*",
                  "media": "/ demo page, /offer, /ws/twilio, /ws/pcm, /metrics, /livez, /readyz",
                  "model": "/v1/chat/completions, /v1/audio/transcriptions, /v1/audio/speech, /v1/models, "
                           "/metrics, /livez, /readyz; no calls"}[role]
        hooks = f"; hooks: {', '.join(agent.hooks.names())}" if agent.hooks else ""
        tools = f"; tools: {', '.join(t.name for t in agent.tools)}" if agent.tools else ""
        stop = (f"SIGTERM drains (up to {config.server.drain_timeout_s:g} s)" if self.handle_signals
                else f"stop() drains (up to {config.server.drain_timeout_s:g} s)")
        progress(f"serving as a{'n' if role == 'all' else ''} {role}{' node' if role != 'all' else '-in-one server'} "
                 f"on {self.url} ({routes}"
                 f"{', SIP on ' + config.sip.host + ':' + str(self.sip_port) if sip else ''}); "
                 f"engines: {engines.describe()}{tools}{hooks}; {stop}")
        notify(f"READY=1\nSTATUS=serving on {config.server.host}:{self.port}")   # Type=notify units
        self._done = asyncio.get_running_loop().create_task(self._close(drain.run()), name="sub300 server")
        return self

    async def _close(self, closing: Any) -> int:
        """Await the drain's end (its exit status), then give the signals back."""
        try:
            self.status = await closing
            return self.status
        finally:
            if self.handle_signals:
                loop = asyncio.get_running_loop()
                for signum in SIGNALS:
                    loop.remove_signal_handler(signum)

    async def wait(self) -> int:
        """Until the server was stopped (a signal, `stop`), drained and closed: its exit status."""
        if self._done is None:
            raise RuntimeError("the server was not started")
        return await asyncio.shield(self._done)

    async def stop(self) -> int:
        """Drain and close (as the first SIGTERM does); the exit status.  A second call forces: the calls
        left are ended at once."""
        if self._done is None:
            raise RuntimeError("the server was not started")
        if not self._done.done():
            self.drain.signal(signal.SIGTERM)
        return await self.wait()


async def serve_async(agent: Agent | None = None, *, host: str | None = None, port: int | None = None,
                      sip: bool | Mapping[str, Any] | None = None, role: str | None = None,
                      progress: Progress | None = None, handle_signals: bool = True) -> int:
    """Serve ``agent`` on the running loop until SIGTERM/SIGINT (``handle_signals``) or cancellation;
    the exit status.  Cancelled, the server is drained and closed before the cancellation goes on."""
    server = Server(agent, host=host, port=port, sip=sip, role=role, progress=progress,
                    handle_signals=handle_signals)
    await server.start()
    try:
        return await server.wait()
    except asyncio.CancelledError:
        await server.stop()
        raise


def serve(agent: Agent | None = None, *, host: str | None = None, port: int | None = None,
          sip: bool | Mapping[str, Any] | None = None, role: str | None = None,
          progress: Progress | None = None) -> int:
    """Run the server for ``agent`` (default: ``Agent()``, the configuration alone) until SIGTERM/SIGINT,
    then drain and return the exit status: what ``sub300 serve`` does (sub300/cli.py calls this).

    A program that has not set up logging gets the command's: plain or JSON lines on stderr
    (``telemetry.log_format``, level ``$SUB300_LOG_LEVEL``), and the start-up lines (``progress``,
    default: ``[sub300] ...`` on stderr).  An error that stops the start (a bad configuration, a model,
    plugin or tool set that cannot run: sub300/failures.py) is one line on stderr and exit status 2 or 3,
    as for the command.  Ctrl-C before the server took the signals (loading the engines): 130."""
    try:
        agent = agent if agent is not None else Agent()
        if not logging.getLogger().handlers:
            config = agent.config
            configure_logging(os.environ.get("SUB300_LOG_LEVEL", "INFO"), config.telemetry.log_format,
                              config.records.redact)
        if progress is None:
            progress = _print_progress
        return asyncio.run(serve_async(agent, host=host, port=port, sip=sip, role=role, progress=progress))
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        failure = startup_failure(error)
        if failure is None:
            raise
        print(failure[1], file=sys.stderr, flush=True)
        return failure[0]


def _print_progress(message: str) -> None:
    print(f"[sub300] {message}", file=sys.stderr, flush=True)
