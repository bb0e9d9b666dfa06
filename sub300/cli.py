"""The `sub300` command: the program's composition root.

The layers below know nothing of each other beyond their allowed imports
(`models` <- `agent` <- `media`, `web`); this module is the one place that
wires them into a program: it reads the configuration, loads the engines,
and starts the transports (file, WebRTC through `web`, SIP through `media`)
that a command needs.  Imports of transports are lazy, per command, so
`sub300 config` loads no model and no media stack.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable

from sub300.agent.config import Config, ConfigError, load_config, override, to_toml
from sub300.agent.log_format import configure_logging
from sub300.models.protocols import ModelError, ModelUnavailable

log = logging.getLogger("sub300")

EXIT_BAD_INPUT = 2
EXIT_MODEL = 3


#: telemetry.log_format = "json": progress lines go through logging too, so stderr is one JSON object a line
_progress_as_log = False


def _progress(message: str) -> None:
    if _progress_as_log:
        log.info("%s", message)
    else:
        print(f"[sub300] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ commands
def cmd_config(args: argparse.Namespace, config: Config) -> int:
    sys.stdout.write(to_toml(config))
    return 0


def cmd_prepare_models(args: argparse.Namespace, config: Config) -> int:
    """Resolve and convert every configured model once, then load each engine to prove it works."""
    from sub300.agent.engines import embedded_llm_dir, load_engines

    t0 = time.perf_counter()
    if config.llm.engine == "embedded":
        _progress(f"LLM ready at {embedded_llm_dir(config, progress=_progress)}")
    engines = load_engines(config, progress=_progress)
    asyncio.run(_warm_and_close(engines, config))
    _progress(f"models ready in {time.perf_counter() - t0:.1f} s")
    return 0


async def _warm_and_close(engines, config: Config) -> None:
    from sub300.agent.engines import warm_up

    try:
        await warm_up(engines, config)
    finally:
        await engines.aclose()


def cmd_converse(args: argparse.Namespace, config: Config) -> int:
    from sub300.media.audio_file import read_audio, write_wav

    caller = read_audio(args.input)  # fails fast, before loading any model
    from sub300.agent.engines import load_engines

    engines = load_engines(config, progress=_progress)
    return asyncio.run(_converse(args, config, engines, caller, write_wav))


async def _converse(args, config: Config, engines, caller, write_wav) -> int:
    from sub300.agent.engines import warm_up
    from sub300.agent.events import TurnDiscarded, TurnFailed, TurnFinished
    from sub300.media.file_transport import converse_with_file

    failed: list[TurnFailed] = []

    def report(event) -> None:
        if isinstance(event, TurnFinished | TurnFailed):
            if isinstance(event, TurnFailed):
                # the one line on stderr is the responder's log line ("turn N failed: LLM …")
                failed.append(event)
            reply = event.reply
            if args.json:
                ledger = event.ledger.to_dict() if event.ledger is not None else {}
                doc = {
                    "turn": event.turn,
                    "transcript": event.transcript,
                    "reply": reply,
                    "marks": ledger.get("marks_ms", {}),
                    "stages_ms": ledger.get("stages_ms", {}),
                    "overlaps_ms": ledger.get("overlaps_ms", {}),
                    "voice_to_voice_ms": ledger.get("voice_to_voice_ms"),
                    "transport_ms": ledger.get("transport_ms", {}),
                    "mouth_to_ear_estimate_ms": ledger.get("mouth_to_ear_estimate_ms"),
                    "mouth_to_ear_reported_ms": ledger.get("mouth_to_ear_reported_ms"),
                    "notes": ledger.get("notes", {}),
                }
                if isinstance(event, TurnFailed):
                    doc["failed"] = {"stage": event.stage, "kind": event.failure, "error": event.error}
                print(json.dumps(doc), flush=True)
            else:
                print(f"\ncaller: {event.transcript}\nagent:  {reply}")
                if isinstance(event, TurnFailed):
                    print(f"turn {event.turn} FAILED ({event.stage} {event.failure}): {event.error}")
                if event.ledger is not None:
                    print(event.ledger.format_table(config.budget_ms), flush=True)
        elif isinstance(event, TurnDiscarded):
            _progress(f"turn {event.turn} discarded: {event.reason}")

    try:
        await warm_up(engines, config)
        result, finished = await converse_with_file(engines, config, caller, [report])
        if result.timed_out:
            _progress("gave up waiting for the agent to finish (timeout)")
        if args.out:
            write_wav(args.out, result.timeline, result.sample_rate)
            _progress(f"wrote {args.out} ({len(result.timeline) / result.sample_rate:.1f} s)")
        if failed:
            kinds = ", ".join(f"turn {e.turn}: {e.stage.upper()} {e.failure}" for e in failed)
            _progress(f"{len(failed)} of {len(failed) + len(finished)} turns failed ({kinds})")
        elif not finished:
            _progress("no turn was answered (no speech detected?)")
        # exit 1: a turn failed (an engine, the LLM endpoint) or the agent never finished
        return 1 if failed or result.timed_out else 0
    finally:
        await engines.aclose()


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    server = {key: value for key, value in (("host", args.host), ("port", args.port), ("role", args.role))
              if value is not None}
    if server:  # checked like the file's values: a bad --port is exit 2, not a bind traceback
        config = override(config, {"server": server}, origin="the command line")
    return serve(config, progress=_progress)


async def start_sip(config: Config, engines, observer, admission=None, auth_limits=None):
    """The SIP service (media/sip), sharing engines, metrics, the admission and the per-source limits
    (``auth_limits``: web/auth.py's, so one INVITE rate per source); None when disabled or on a model node."""
    if not config.sip.enabled or config.server.role == "model":
        return None
    from sub300.media.sip.service import start_sip_service

    return await start_sip_service(config, engines, observer, admission=admission, auth_limits=auth_limits)


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


def serve(config: Config, progress: Callable[[str], None] = print) -> int:
    """Run the server until SIGTERM/SIGINT, then drain (sub300/drain.py) and return the exit status.

    The web app (page, signalling, metrics, OpenAI API) and, when enabled, the
    SIP service share one set of engines and one admission (a call counts
    against one capacity, whatever its transport).  ``server.role`` (``--role``)
    chooses what is served (web/server.py): ``model`` starts no SIP listener
    and takes no call, ``media`` logs each stage's remote endpoint (a warning
    for a stage still in process); the start-up line names the role.  Start-up: load and warm
    the engines, bind HTTP (/livez answers; /readyz says "starting" while SIP
    is not bound), bind SIP, then ready.  Stop: the first signal drains —
    /readyz 503 "draining", new calls 503, each call finishes its turn, hears
    ``server.drain_goodbye`` and is hung up, within ``server.drain_timeout_s``;
    a second signal or the timeout ends the rest at once — then the closers
    run in order (SIP, the web app and the engines) and the status is 0 (1 when
    a closer failed).

    The shutdown is ordinary code on a live event loop.  It used to run inside
    `asyncio.run`'s cancellation of every task (aiohttp's ``handle_signals``
    raises `GracefulExit` out of the loop): aiortc's own tasks were cancelled
    together with the calls' closing, its DTLS transport went "closed" and its
    peer connection started a `close()` of its own that was cancelled
    half-way, so `WebRtcCall`'s `pc.close()` waited forever on that close's
    future and the process never exited (py-spy and a task dump, 2026-11-30).
    """
    from aiohttp import web

    from sub300.agent.admission import Admission
    from sub300.agent.calls import ObserverGroup
    from sub300.agent.engines import load_engines, warm_up
    from sub300.agent.metrics import MetricsObserver
    from sub300.agent.records import open_store
    from sub300.agent.tracing import TracingObserver, setup_tracing
    from sub300.cli_records import start_records
    from sub300.drain import Drain, SipCalls, WebRtcCalls
    from sub300.sd_notify import notify
    from sub300.web.auth import add_auth_routes
    from sub300.web.server import MODEL_REQUESTS_KEY, SIGNALLING_KEY, Readiness, build_app

    role = config.server.role
    for level, line in describe_role(config):
        getattr(log, level)("%s", line)
    engines = load_engines(config, progress=progress)

    async def main() -> int:
        admission = Admission.from_config(config, device=engines.stt.device.split("/")[0])
        drain = Drain(admission, timeout_s=config.server.drain_timeout_s, goodbye=config.server.drain_goodbye)
        drain.install(asyncio.get_running_loop())
        drain.on_drain.append(lambda: notify("STOPPING=1\nSTATUS=draining"))
        drain.closers.append(("the engines", engines.aclose))   # replaced by the web app's cleanup below
        try:
            await warm_up(engines, config)
            if drain.stopping:
                return await drain.close()
            observer = MetricsObserver(config.budget_ms, admission=admission)
            readiness = Readiness(("sip",) if config.sip.enabled and role != "model" else ())
            app = build_app(config, engines, observer, admission, readiness)
            # one database for the API keys (web/auth.py) and the records (agent/records); opened (and
            # migrated) off the loop.  Both add middleware or routes, so before runner.setup().
            store = await asyncio.to_thread(open_store, config)
            progress(f"records and API keys: {store.url}")
            auth = add_auth_routes(app, config, store)
            progress(auth.describe())
            records = await start_records(config, app, observer, store=store)
            call_observer = records.call_observer if records is not None else observer
            tracer = setup_tracing(config)   # [telemetry].otlp_endpoint: a trace per call (agent/tracing.py)
            if tracer is not None:
                call_observer = ObserverGroup([call_observer, TracingObserver(tracer)])
                app[SIGNALLING_KEY].observer = call_observer
            runner = web.AppRunner(app, handle_signals=False)
            await runner.setup()
            # the web app's cleanup closes every WebRTC call left and the engines (web/server.py)
            drain.closers[:] = [("the web app", runner.cleanup)]
            drain.calls.append(WebRtcCalls(app[SIGNALLING_KEY]))
            drain.calls.append(app[MODEL_REQUESTS_KEY])   # model requests in flight finish their answer
            if records is not None:   # records: last, once every call ended: writes what is queued
                drain.closers.append(("the records", records.aclose))
            else:                     # the key store alone
                drain.closers.append(("the key store", functools.partial(asyncio.to_thread, store.close)))
            if tracer is not None:    # then the spans still queued go out (bounded by the exporter's timeout)
                drain.closers.append(("the traces", functools.partial(asyncio.to_thread, tracer.shutdown)))
            site = web.TCPSite(runner, config.server.host, config.server.port)
            await site.start()
            sip = await start_sip(config, engines, call_observer, admission, auth_limits=auth.limits)
            if sip is not None:
                drain.calls.append(SipCalls(sip))
                drain.closers.insert(0, ("SIP", sip.close))
                readiness.bound("sip")
        except BaseException:
            await drain.close()
            raise
        routes = {"all": "/ demo page, /offer, /metrics, /livez, /readyz, /v1/chat/completions, /v1/audio/*",
                  "media": "/ demo page, /offer, /metrics, /livez, /readyz",
                  "model": "/v1/chat/completions, /v1/audio/transcriptions, /v1/audio/speech, /v1/models, "
                           "/metrics, /livez, /readyz; no calls"}[role]
        progress(f"serving as a{'n' if role == 'all' else ''} {role}{' node' if role != 'all' else '-in-one server'} "
                 f"on http://{config.server.host}:{config.server.port} ({routes}"
                 f"{', SIP on ' + config.sip.host + ':' + str(config.sip.port) if sip else ''}); "
                 f"engines: {engines.describe()}; SIGTERM drains (up to {config.server.drain_timeout_s:g} s)")
        notify(f"READY=1\nSTATUS=serving on {config.server.host}:{config.server.port}")   # Type=notify units
        return await drain.run()

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:  # Ctrl-C before the drain took the signal (loading the engines)
        return 130


# ------------------------------------------------------------------ entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sub300", description="Real-time voice agent server")
    parser.add_argument("--config", help="TOML configuration file (default: $SUB300_CONFIG)")
    parser.add_argument("--log-level", default=os.environ.get("SUB300_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("config", help="print the effective configuration as TOML").set_defaults(run=cmd_config)
    sub.add_parser("prepare-models", help="convert and load the configured models once").set_defaults(
        run=cmd_prepare_models
    )
    converse = sub.add_parser("converse", help="talk to the agent with an audio file, in real time")
    converse.add_argument("input", help="the caller's audio (WAV, FLAC, MP3, ... any rate)")
    converse.add_argument("--out", help="write the agent's audio here (WAV, aligned with the input)")
    converse.add_argument("--json", action="store_true", help="one JSON document per turn on stdout")
    converse.set_defaults(run=cmd_converse)
    serve = sub.add_parser("serve", help="run the server (web page, signalling, metrics, OpenAI API)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--role", choices=("all", "media", "model"),
                       help="server.role: all (default) | media (calls; engines remote) | model (serves its engines)")
    serve.set_defaults(run=cmd_serve)
    __import__("sub300.cli_records", fromlist=["register"]).register(sub)   # usage, export, forget, records, db
    __import__("sub300.cli_keys", fromlist=["register"]).register(sub)   # keys create | list | revoke
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not isinstance(logging.getLevelName(args.log_level.upper()), int):
        print(f"sub300: configuration error: --log-level / SUB300_LOG_LEVEL = {args.log_level!r} is not allowed: "
              "expected one of debug, info, warning, error, critical", file=sys.stderr)
        return EXIT_BAD_INPUT
    configure_logging(args.log_level, "plain")   # until the configuration says which format
    try:
        config = load_config(args.config)
        configure_logging(args.log_level, config.telemetry.log_format, config.records.redact)
        global _progress_as_log
        _progress_as_log = config.telemetry.log_format == "json"
        return args.run(args, config)
    except ConfigError as error:
        print(f"sub300: configuration error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModelUnavailable as error:
        print(f"sub300: model unavailable: {error}", file=sys.stderr)
        return EXIT_MODEL
    except ModelError as error:
        print(f"sub300: model error: {error}", file=sys.stderr)
        return EXIT_MODEL
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        from sub300.media.audio_file import AudioFileError

        if isinstance(error, AudioFileError):
            print(f"sub300: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise


if __name__ == "__main__":
    sys.exit(main())
