"""The `sub300` command: the process's composition root.

This is the one module of `agent/` that reaches into `media/` and `web/`
(lazily, per command) to wire transports to the conversation core.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time

from models.protocols import ModelError, ModelUnavailable

from .config import Config, ConfigError, load_config, to_toml

log = logging.getLogger("sub300")

EXIT_BAD_INPUT = 2
EXIT_MODEL = 3


def _progress(message: str) -> None:
    print(f"[sub300] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ commands
def cmd_config(args: argparse.Namespace, config: Config) -> int:
    sys.stdout.write(to_toml(config))
    return 0


def cmd_prepare_models(args: argparse.Namespace, config: Config) -> int:
    """Resolve and convert every configured model once, then load each engine to prove it works."""
    from .engines import embedded_llm_dir, load_engines

    t0 = time.perf_counter()
    if config.llm.engine == "embedded":
        _progress(f"LLM ready at {embedded_llm_dir(config, progress=_progress)}")
    engines = load_engines(config, progress=_progress)
    asyncio.run(_warm_and_close(engines, config))
    _progress(f"models ready in {time.perf_counter() - t0:.1f} s")
    return 0


async def _warm_and_close(engines, config: Config) -> None:
    from .engines import warm_up

    try:
        await warm_up(engines, config)
    finally:
        await engines.aclose()


def cmd_converse(args: argparse.Namespace, config: Config) -> int:
    from media.audio_file import read_audio, write_wav

    caller = read_audio(args.input)  # fails fast, before loading any model
    from .engines import load_engines

    engines = load_engines(config, progress=_progress)
    return asyncio.run(_converse(args, config, engines, caller, write_wav))


async def _converse(args, config: Config, engines, caller, write_wav) -> int:
    from media.file_transport import converse_with_file

    from .engines import warm_up
    from .events import TurnDiscarded, TurnFailed, TurnFinished

    failures = 0

    def report(event) -> None:
        nonlocal failures
        if isinstance(event, TurnFinished):
            if args.json:
                ledger = event.ledger.to_dict()
                doc = {
                    "turn": event.turn,
                    "transcript": event.transcript,
                    "reply": event.reply,
                    "marks": ledger["marks_ms"],
                    "stages_ms": ledger["stages_ms"],
                    "overlaps_ms": ledger["overlaps_ms"],
                    "voice_to_voice_ms": ledger["voice_to_voice_ms"],
                    "notes": ledger["notes"],
                }
                print(json.dumps(doc), flush=True)
            else:
                print(f"\ncaller: {event.transcript}\nagent:  {event.reply}")
                print(event.ledger.format_table(config.budget_ms), flush=True)
        elif isinstance(event, TurnFailed):
            failures += 1
            _progress(f"turn {event.turn} failed: {event.error}")
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
        if not finished:
            _progress("no turn was answered (no speech detected?)")
        return 1 if failures or result.timed_out else 0
    finally:
        await engines.aclose()


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    from web.server import serve

    if args.host:
        config.server.host = args.host
    if args.port is not None:
        config.server.port = args.port
    return serve(config, progress=_progress)


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
    serve.set_defaults(run=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(args.config)
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
        from media.audio_file import AudioFileError

        if isinstance(error, AudioFileError):
            print(f"sub300: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise


if __name__ == "__main__":
    sys.exit(main())
