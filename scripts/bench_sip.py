#!/usr/bin/env python3
"""Voice-to-voice for phone calls: sipp calls the SIP service, p50/p95 per stage.

Each call: sipp streams a spoken question (Piper, made here) as μ-law RTP;
once the answer has played, sipp says "Goodbye." and the agent hangs up.
The first turn's ledger is the sample.  For the SIP path, `first_audio_out` is the
moment the reply's first RTP packet leaves, and `speech_end` the arrival of
the caller's last voiced packet.  With --file, the same questions also go
through the paced file path in the same process, interleaved, as a
baseline for what SIP adds.

    .venv/bin/python scripts/bench_sip.py --calls 8 --file
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np
from bench_turns import QUESTIONS, summarize
from machine_info import describe_machine

from sub300.agent.audio import resample
from sub300.agent.config import load_config
from sub300.agent.engines import load_engines, warm_up
from sub300.agent.events import TurnFinished
from sub300.media.audio_file import write_wav
from sub300.media.file_transport import converse_with_file
from sub300.media.sip.service import start_sip_service
from tests.test_sip_support import RecordingObserver, poke_when, scenario_call, sipp


def spoken(tts, text: str) -> np.ndarray:
    return resample(np.concatenate(list(tts.synthesize(text))), tts.sample_rate, 16000)


async def main_async(args) -> None:
    config = load_config(args.config)
    config.sip.host, config.sip.port = "127.0.0.1", 0
    engines = load_engines(config, progress=lambda m: print(f"# {m}", file=sys.stderr))
    await warm_up(engines, config)
    observer = RecordingObserver()
    service = await start_sip_service(config, engines, observer)
    tmp = Path(tempfile.mkdtemp(prefix="bench_sip_"))
    goodbye = np.concatenate([np.zeros(4800, np.int16), spoken(engines.tts, "Goodbye."), np.zeros(16000, np.int16)])
    write_wav(tmp / "goodbye.wav", goodbye, 16000)
    subprocess.run(["sox", "-D", str(tmp / "goodbye.wav"), "-r", "8000", "-c", "1", "-t", "ul", str(tmp / "goodbye.ulaw")],
                   check=True)
    sip_ledgers, file_ledgers, heard = [], [], 0
    try:
        for i, (text, keys) in enumerate((QUESTIONS * (1 + args.calls // len(QUESTIONS)))[: args.calls]):
            pcm = np.concatenate([np.zeros(8000, np.int16), spoken(engines.tts, text), np.zeros(16000, np.int16)])
            wav, ulaw = tmp / f"q{i}.wav", tmp / f"q{i}.ulaw"
            write_wav(wav, pcm, 16000)
            subprocess.run(["sox", "-D", str(wav), "-r", "8000", "-c", "1", "-t", "ul", str(ulaw)], check=True)
            before = set(observer.calls)
            peer = sipp(tmp, scenario_call(str(ulaw), timeout_ms=60000, goodbye=str(tmp / "goodbye.ulaw")),
                        service.address, f"sipp{i}")
            try:
                await poke_when(service, observer,
                                lambda events: any(isinstance(e, TurnFinished) for e in events), timeout=60)
                rc = await peer.wait(90)
            finally:
                peer.stop()
            await observer.wait_ended(len(before) + 1)
            (call_id,) = set(observer.calls) - before
            turns = observer.calls[call_id].turns
            if rc != 0 or not turns:
                print(f"# call {i + 1}: sipp rc {rc}, {len(turns)} turns: skipped", file=sys.stderr)
                continue
            turn = turns[0]
            if turn.ledger.voice_to_voice_ms is None:
                print(f"# call {i + 1}: no first_audio_out in the ledger: skipped", file=sys.stderr)
                continue
            sip_ledgers.append(turn.ledger)
            heard += keys <= set(re.findall(r"[a-z0-9']+", turn.transcript.lower()))
            print(f"# sip  q{i + 1} {turn.transcript!r} -> {turn.reply[:50]!r} v2v {turn.ledger.voice_to_voice_ms:.0f} ms",
                  file=sys.stderr)
            if args.file:
                _, finished = await converse_with_file(engines, config, pcm)
                if finished and finished[0].ledger.voice_to_voice_ms is not None:
                    file_ledgers.append(finished[0].ledger)
                    print(f"# file q{i + 1} v2v {finished[0].ledger.voice_to_voice_ms:.0f} ms", file=sys.stderr)
    finally:
        await service.close()
        await engines.aclose()
    print(f"Voice-to-voice, phone calls (sipp → SIP/RTP G.711 → sub300, loopback) — {describe_machine()}")
    print(f"engines: {engines.describe()}; hangover {config.vad.hangover_ms} ms; llm max_tokens {config.llm.max_tokens}")
    print(summarize("SIP (PCMU 8 kHz)", sip_ledgers, heard, args.calls))
    if args.file:
        print(summarize("file path, same questions (baseline)", file_ledgers, len(file_ledgers), args.calls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--config")
    parser.add_argument("--file", action="store_true", help="also run the paced file path on the same questions")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
