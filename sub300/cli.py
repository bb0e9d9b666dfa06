"""The `sub300` command: the program's composition root.

The layers below know nothing of each other beyond their allowed imports
(`models` <- `agent` <- `media`, `web`); this module is the one place that
wires them into a program: it reads the configuration, loads the engines,
and starts the transports (file, WebRTC through `web`, SIP through `media`)
that a command needs.  Imports of transports are lazy, per command, so
`sub300 config` loads no model and no media stack.  `sub300 serve` is the
Python API's `serve` (sub300/server.py) for ``Agent(config=...)``: the
command and a user's own agent run the same server code.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time

from sub300.agent.config import Config, ConfigError, load_config, override, to_toml
from sub300.agent.log_format import configure_logging
from sub300.agent.plugins import PluginError
from sub300.agent.tools import ToolsUnsupported
from sub300.failures import EXIT_BAD_INPUT, EXIT_MODEL, startup_failure
from sub300.models.protocols import ModelError
from sub300.server import describe_role, serve

__all__ = ["build_parser", "describe_role", "main", "serve"]

log = logging.getLogger("sub300")


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
    """`sub300 serve`: the Python API's `serve` (sub300/server.py) for the agent the configuration defines."""
    from sub300.api import Agent

    server = {key: value for key, value in (("host", args.host), ("port", args.port), ("role", args.role))
              if value is not None}
    if server:  # checked like the file's values: a bad --port is exit 2, not a bind traceback
        config = override(config, {"server": server}, origin="the command line")
    return serve(Agent(config=config), progress=_progress)


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
    except (ConfigError, ModelError, PluginError, ToolsUnsupported) as error:
        status, line = startup_failure(error) or (EXIT_MODEL, str(error))
        print(line, file=sys.stderr)
        return status
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
