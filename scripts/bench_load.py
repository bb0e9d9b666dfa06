#!/usr/bin/env python3
"""Many calls at once: voice-to-voice, queue waits and goodput against the number of concurrent calls.

For each N in ``--calls``, N callers are held on the line for ``--duration-s``
seconds.  Each asks the benchmark's questions (scripts/bench_turns.py
QUESTIONS, spoken by Piper here), one after the other, each caller starting
at a different question, with a human pause between turns (uniform 1-3 s,
seeded), and starts spread evenly over ``--stagger-s`` seconds.  A caller
asks no new question once the duration is over; the turn in flight is
finished (at most ``--turn-timeout-s``).

Transports:

* ``inproc`` (default): the engines alone.  One process, ONE shared
  `Engines` (loaded once), each caller a fresh `Conversation` fed 20 ms
  frames on the wall clock exactly like the file transport
  (media/file_transport.py), the agent's audio pulled on the same tick.
* ``webrtc``: the whole server.  `sub300 serve` runs as its own process
  (as in scripts/bench_webrtc.py) and N aiortc callers
  (sub300/testing/aiortc_caller.py) call it; the ledger comes back over the
  data channel, and the caller's mouth-to-ear is reported beside it.
  CPU and RSS are the server process's.
* ``sip``: the SIP service in this process on the shared engines (as in
  scripts/bench_sip.py), N sipp callers streaming G.711 μ-law over RTP.
  sipp cannot wait for the agent, so each caller's line is one fixed
  schedule (open loop): question, ``--sip-answer-s`` for the answer, a
  pause, the next question; a question that produced no turn is unanswered.

Per N: p50/p95/p99 voice-to-voice over every turn asked (a turn that failed,
was dropped or timed out counts as infinitely late, so it can never hold an
SLO), each engine's queue wait p50/p95 (the ledger's ``queue_ms``: request →
start of work of the turn's critical-path request), goodput (share of the
turns asked answered within each ``--slo-ms``), turns answered/failed, the
process's CPU (100 % = one core busy, from /proc/PID/stat), its peak RSS
(VmRSS sampled every 0.25 s), and with ``nvidia-smi`` the GPU's utilisation
and memory (sampled every second).

Capacity = the largest N whose p95 holds the first SLO (0 when none does);
``--write-capacity FILE`` writes it for the admission (agent/admission.py).
``--simultaneous`` is the worst case: every caller starts at the same instant,
says questions padded at the front to one length so all stop speaking on the
same 20 ms tick, and the next round starts for all at once after the last
caller's answer (same pause for all).

Outputs (``--out DIR``): load.md (the table, also printed), load.json
(everything: every turn's ledger summary), load.png (p50/p95 against N with
the SLO lines; needs matplotlib: ``pip install 'sub300[bench]'``).

    .venv/bin/python scripts/bench_load.py --calls 1,2,4 --duration-s 60 --out /tmp/load
    .venv/bin/python scripts/bench_load.py --calls 1,2,4 --simultaneous --duration-s 30
    .venv/bin/python scripts/bench_load.py --transport webrtc --calls 1,2,4 --duration-s 60
    .venv/bin/python scripts/bench_load.py --transport sip --calls 1,2,4 --duration-s 60

Against a server (webrtc, sip) the admission limits are lifted to the largest
N and its queue-wait guard is off, so the benchmark measures past capacity;
``--keep-admission`` keeps them (refused calls then count as unanswered).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np  # noqa: E402
from bench_turns import QUESTIONS, speak_questions  # noqa: E402
from machine_info import describe_machine, percentile  # noqa: E402

from sub300.agent.ledger import ENGINE_STAGES  # noqa: E402

FRAME_MS = 20
FRAME = 16000 * FRAME_MS // 1000
PAUSE_S = (1.0, 3.0)       # a human's pause between hearing the answer and asking again (uniform)


# ------------------------------------------------------------------ one turn's outcome
@dataclass
class TurnRow:
    calls: int
    caller: int
    question: str
    #: answered | failed (TurnFailed) | discarded (no words heard) | timeout (no answer in time) | error
    outcome: str
    v2v_ms: float | None = None
    queue_ms: dict[str, float] = field(default_factory=dict)
    work_ms: dict[str, float] = field(default_factory=dict)
    stages_ms: dict[str, float] = field(default_factory=dict)
    transcript: str = ""
    mouth_to_ear_ms: float | None = None   # webrtc only: measured by the caller
    detail: str = ""
    #: per engine stage, a remote engine's time on the network (the ledger's ``network_ms``; empty in process)
    network_ms: dict[str, float] = field(default_factory=dict)

    @property
    def latency_ms(self) -> float:
        """Voice-to-voice for the statistics: infinite unless answered."""
        if self.outcome == "answered" and self.v2v_ms is not None:
            return self.v2v_ms
        return math.inf


# ------------------------------------------------------------------ process sampling
def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (proc(5): fields 14 and 15, in clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


class Sampler:
    """A thread sampling one process's RSS (every 0.25 s) and the GPU (every 1 s, when nvidia-smi exists).

    The event loop may be saturated under load, so sampling runs in its own
    thread; CPU % is the process's CPU seconds over the wall time between
    `start` and `stop` (100 % = one core).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.nvidia_smi = shutil.which("nvidia-smi")
        self._stop = threading.Event()
        self.rss: list[float] = []
        self.gpu_util: list[float] = []
        self.gpu_mem: list[float] = []
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._wall0, self._cpu0 = time.monotonic(), _proc_cpu_s(self.pid)
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()

    def _gpu(self) -> None:
        assert self.nvidia_smi is not None
        try:
            out = subprocess.run([self.nvidia_smi, "--query-gpu=utilization.gpu,memory.used",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
            util, mem = out.stdout.strip().splitlines()[0].split(",")
            self.gpu_util.append(float(util))
            self.gpu_mem.append(float(mem))
        except (subprocess.SubprocessError, ValueError, IndexError) as exc:
            print(f"# nvidia-smi sample failed: {exc}", file=sys.stderr)

    def _run(self) -> None:
        next_gpu = 0.0
        while not self._stop.is_set():
            try:
                self.rss.append(_proc_rss_mib(self.pid))
            except OSError:
                return
            if self.nvidia_smi and time.monotonic() >= next_gpu:
                next_gpu = time.monotonic() + 1.0
                self._gpu()
            self._stop.wait(0.25)

    def stop(self) -> dict:
        wall, cpu = time.monotonic() - self._wall0, _proc_cpu_s(self.pid) - self._cpu0
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return {
            "cpu_pct": round(100.0 * cpu / wall, 1) if wall > 0 else None,
            "cores": os.cpu_count(),
            "peak_rss_mib": round(max(self.rss), 1) if self.rss else None,
            "gpu_util_mean_pct": round(float(np.mean(self.gpu_util)), 1) if self.gpu_util else None,
            "gpu_util_max_pct": max(self.gpu_util) if self.gpu_util else None,
            "gpu_mem_max_mib": max(self.gpu_mem) if self.gpu_mem else None,
        }


# ------------------------------------------------------------------ the plan of one N
@dataclass
class Plan:
    calls: int
    t0: float                  # monotonic time the first caller starts
    duration_s: float
    stagger_s: float
    turn_timeout_s: float
    simultaneous: bool
    seed: int
    #: simultaneous mode: callers that finished the current round, and the tick the next round starts at
    round_done: dict[int, int] = field(default_factory=dict)
    round_start_tick: dict[int, int] = field(default_factory=dict)

    @property
    def end(self) -> float:
        return self.t0 + self.duration_s

    def start_of(self, caller: int) -> float:
        if self.simultaneous or self.calls == 1:
            return self.t0
        return self.t0 + self.stagger_s * caller / self.calls

    def rng(self, caller: int) -> random.Random:
        # simultaneous: one pause sequence for all, so rounds stay aligned
        return random.Random(self.seed * 100_003 + (0 if self.simultaneous else caller))


def padded_to_one_length(questions: list) -> list:
    """Questions padded with silence at the front to the longest one's length: same start, same end."""
    longest = max(len(pcm) for _, _, pcm in questions)
    return [(t, k, np.concatenate([np.zeros(longest - len(pcm), np.int16), pcm])) for t, k, pcm in questions]


# ------------------------------------------------------------------ in-process callers
class InprocCaller:
    """A caller on a fresh Conversation over the shared engines, ticking 20 ms on a grid from ``start``."""

    def __init__(self, engines, config, start: float) -> None:
        from sub300.agent.conversation import Conversation
        from sub300.agent.playout import PlayoutQueue
        from sub300.media.pacing import Pacer

        self.events: list = []
        self.playout = PlayoutQueue(engines.tts.sample_rate, time.monotonic)
        self.conversation = Conversation(engines, config, self.playout, listeners=[self.events.append])
        self.pacer = Pacer(FRAME_MS / 1000, time.monotonic, start=start)
        self._out_frame = self.playout.sample_rate * FRAME_MS // 1000
        self._silence = np.zeros(FRAME, np.int16)

    async def tick(self, chunk: np.ndarray | None = None) -> None:
        from sub300.agent.audio import AudioFrame

        deadline = await self.pacer.next_tick()
        self.playout.pull(self._out_frame)
        self.conversation.push_frame(AudioFrame(self._silence if chunk is None else chunk, deadline))

    async def say(self, pcm: np.ndarray) -> None:
        for i in range(0, len(pcm), FRAME):
            chunk = pcm[i:i + FRAME]
            if len(chunk) < FRAME:
                chunk = np.concatenate([chunk, self._silence[: FRAME - len(chunk)]])
            await self.tick(chunk)

    async def silence_until(self, predicate, timeout_s: float) -> bool:
        """Silence on the line until ``predicate()``; False after ``timeout_s``."""
        end = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > end:
                return False
            await self.tick()
        return True


def _rows_from_events(events: list, calls: int, caller: int, question: str) -> list[TurnRow]:
    from sub300.agent.events import TurnDiscarded, TurnFailed, TurnFinished

    rows = []
    for event in events:
        if isinstance(event, TurnFinished):
            ledger = event.ledger
            rows.append(TurnRow(calls, caller, question, "answered", ledger.voice_to_voice_ms,
                                dict(ledger.queue_ms), dict(ledger.work_ms),
                                {k: round(v, 1) for k, v in ledger.stages_ms().items()}, event.transcript,
                                network_ms=dict(ledger.network_ms)))
        elif isinstance(event, TurnFailed):
            rows.append(TurnRow(calls, caller, question, "failed", detail=event.error))
        elif isinstance(event, TurnDiscarded):
            rows.append(TurnRow(calls, caller, question, "discarded", detail=event.reason))
    return rows


def _stuck_state(caller, engines) -> str:
    """What a call that got no answer was doing, for the log: its events since the question, the turn
    state, the reply, and the shared engines' queues."""
    if os.environ.get("BENCH_LOAD_STACKS"):
        import faulthandler

        faulthandler.dump_traceback(all_threads=True)      # where every thread is (stderr)
    conv = caller.conversation
    reply = conv._responder.reply
    events = [type(e).__name__ for e in caller.events[-8:]]
    llm = getattr(engines.llm, "scheduler", None)
    queues = {name: getattr(engine, "waiting", "-") for name, engine in
              (("stt", engines.stt), ("llm", engines.llm), ("tts", engines.tts))}
    return (f"state {conv.turn_state.state.name}, answering {conv._responder.answering}, "
            f"reply {'none' if reply is None else (reply.text[:40], reply.ledger.marks.keys())}, "
            f"playout idle {conv.playout.idle}, last events {events}, queues {queues}, "
            f"llm active {getattr(llm, 'active', '-')}")


def _resolved(events: list) -> bool:
    from sub300.agent.events import TurnDiscarded, TurnFailed, TurnFinished

    return any(isinstance(e, TurnFinished | TurnFailed | TurnDiscarded) for e in events)


async def inproc_caller(engines, config, plan: Plan, index: int, questions: list) -> list[TurnRow]:
    start = plan.start_of(index)
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    caller = InprocCaller(engines, config, start)
    rng = plan.rng(index)
    rows: list[TurnRow] = []
    q, round_no = index, 0
    try:
        while True:
            text, _keys, pcm = questions[q % len(questions)]
            before = len(caller.events)
            await caller.say(pcm)
            done = await caller.silence_until(
                lambda b=before: _resolved(caller.events[b:]) and not caller.conversation.busy, plan.turn_timeout_s)
            got = _rows_from_events(caller.events[before:], plan.calls, index, text)
            rows += got or [TurnRow(plan.calls, index, text, "timeout" if not done else "error",
                                    detail="no answer" if not done else "no turn event")]
            if not done:
                print(f"# N={plan.calls} caller {index}: no answer to {text!r} within {plan.turn_timeout_s:.0f} s; "
                      f"{_stuck_state(caller, engines)}", file=sys.stderr)
            pause_ticks = round(rng.uniform(*PAUSE_S) * 1000 / FRAME_MS)
            if plan.simultaneous:
                # the round ends when every caller has its answer; the next starts for all on one tick
                plan.round_done[round_no] = plan.round_done.get(round_no, 0) + 1
                if plan.round_done[round_no] == plan.calls:
                    plan.round_start_tick[round_no] = caller.pacer.count + pause_ticks
                await caller.silence_until(lambda r=round_no: r in plan.round_start_tick, plan.turn_timeout_s * 2)
                start_tick = plan.round_start_tick.get(round_no, caller.pacer.count)
                if time.monotonic() >= plan.end:
                    break
                while caller.pacer.count < start_tick:
                    await caller.tick()
                round_no += 1
                q += 1
                continue
            if time.monotonic() >= plan.end:
                break
            for _ in range(pause_ticks):
                await caller.tick()
            q += 1
    except Exception as exc:   # one broken caller is a row, not the end of the run
        rows.append(TurnRow(plan.calls, index, "", "error", detail=f"{type(exc).__name__}: {exc}"))
    finally:
        await caller.conversation.aclose()
    return rows


async def run_inproc(args, config, ns: list[int], report: Report) -> None:
    from sub300.agent.engines import load_engines, warm_up

    engines = load_engines(config, progress=lambda m: print(f"# {m}", file=sys.stderr))
    await warm_up(engines, config)
    questions = speak_questions(engines.tts, len(QUESTIONS))
    if args.simultaneous:
        questions = padded_to_one_length(questions)
    try:
        for n in ns:
            plan = Plan(n, time.monotonic() + 0.5, args.duration_s, args.stagger_s, args.turn_timeout_s,
                        args.simultaneous, args.seed)
            sampler = Sampler(os.getpid())
            sampler.start()
            per_caller = await asyncio.gather(*(inproc_caller(engines, config, plan, i, questions) for i in range(n)))
            resources = sampler.stop()
            rows = [r for caller_rows in per_caller for r in caller_rows]
            report.add(summarize(n, rows, resources, args.slo_ms), rows, engines.describe())
    finally:
        await engines.aclose()


# ------------------------------------------------------------------ WebRTC callers against a server
def _has_admission() -> bool:
    from sub300.agent.config import Config

    return "admission" in Config.model_fields


def _has_auth() -> bool:
    from sub300.agent.config import Config

    return "auth" in Config.model_fields


def lift_admission(config, max_calls: int) -> None:
    """Let every benchmark call in: the point is to measure past capacity (``--keep-admission`` keeps the limits).
    The per-source rate limits go too: every benchmark caller comes from 127.0.0.1."""
    if _has_admission():
        config.admission.max_calls = max_calls
        config.admission.max_queue_wait_ms = 0.0
    if _has_auth():
        config.auth.sip_invites_per_minute = config.auth.source_calls_per_minute = 0
    config.sip.max_calls = config.webrtc.max_calls = max(max_calls, 1)


def start_server(port: int, max_calls: int, keep_admission: bool, extra_env: dict[str, str] | None = None,
                 log: Path | None = None) -> subprocess.Popen:
    """`sub300 serve` as its own process with the default configuration (the user's SUB300_* dropped), plus
    ``extra_env`` (e.g. SUB300_SERVER_ROLE; scripts/bench_cluster.py); its stderr to the file ``log`` if given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUB300_")}
    if not keep_admission:
        env["SUB300_WEBRTC_MAX_CALLS"] = str(max_calls)
        if _has_admission():
            env.update(SUB300_ADMISSION_MAX_CALLS=str(max_calls), SUB300_ADMISSION_MAX_QUEUE_WAIT_MS="0")
    if _has_auth():   # every benchmark caller comes from 127.0.0.1: no per-source rate limit
        env.update(SUB300_AUTH_SOURCE_CALLS_PER_MINUTE="0", SUB300_AUTH_SIP_INVITES_PER_MINUTE="0")
        # records stay on (they are part of the server's cost) but go to a database of the run's own
        env["SUB300_RECORDS_URL"] = f"sqlite:///{tempfile.mkdtemp(prefix='bench-load-')}/records.db"
    env.update(extra_env or {})
    command = [sys.executable, "-m", "sub300.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if log is None:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with log.open("ab") as stderr:   # the child keeps its own descriptor
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)


async def webrtc_caller(session, url: str, plan: Plan, index: int, questions: list) -> list[TurnRow]:
    from sub300.testing.aiortc_caller import AiortcCaller

    await asyncio.sleep(max(0.0, plan.start_of(index) - time.monotonic()))
    caller = AiortcCaller(url, session)
    rng = plan.rng(index)
    rows: list[TurnRow] = []
    q = index
    try:
        await caller.connect()
        while True:
            text, _keys, pcm = questions[q % len(questions)]
            k = len(caller.events_of("turn")) + 1
            onsets = len(caller.onsets)
            caller.say(pcm)
            try:
                turns = await caller.wait_for_turns(k, plan.turn_timeout_s)
                def heard_reply(before: int = onsets) -> bool:
                    return len(caller.onsets) > before

                await caller.wait_for(heard_reply, 10, "reply onset")
                await caller.wait_for(lambda: caller.events_of("state")[-1].get("state") == "listening",
                                      plan.turn_timeout_s, "the agent done")
                ledger = turns[k - 1]["ledger"]
                failed = "failed" in ledger.get("notes", {})
                rows.append(TurnRow(plan.calls, index, text, "failed" if failed else "answered",
                                    ledger.get("voice_to_voice_ms"), dict(ledger.get("queue_ms", {})),
                                    dict(ledger.get("work_ms", {})), dict(ledger.get("stages_ms", {})),
                                    turns[k - 1].get("transcript", ""), caller.onsets[onsets].mouth_to_ear_ms,
                                    network_ms=dict(ledger.get("network_ms", {}))))
            except TimeoutError as exc:
                rows.append(TurnRow(plan.calls, index, text, "timeout", detail=str(exc)))
                break   # the call's state is unknown now: hang up
            if time.monotonic() >= plan.end:
                break
            await asyncio.sleep(rng.uniform(*PAUSE_S))   # the track sends silence meanwhile
            q += 1
    except Exception as exc:
        rows.append(TurnRow(plan.calls, index, "", "error", detail=f"{type(exc).__name__}: {exc}"))
    finally:
        await caller.hang_up()
    return rows


async def run_webrtc(args, ns: list[int], report: Report) -> None:
    import aiohttp
    from bench_webrtc import LEAD_S, TAIL_S, wait_healthy

    from tests.speech import compose, speak

    print("# making questions with Piper…", file=sys.stderr)
    questions = [(t, k, compose(LEAD_S, speak(t), TAIL_S)) for t, k in QUESTIONS]
    if args.simultaneous:
        questions = padded_to_one_length(questions)
    server = None if args.url else start_server(args.port, max(ns), args.keep_admission)
    url = args.url or f"http://127.0.0.1:{args.port}"
    try:
        async with aiohttp.ClientSession() as session:
            health = await wait_healthy(session, url)
            for n in ns:
                plan = Plan(n, time.monotonic() + 0.5, args.duration_s, args.stagger_s, args.turn_timeout_s,
                            args.simultaneous, args.seed)
                sampler = Sampler(server.pid if server is not None else os.getpid())
                sampler.start()
                per_caller = await asyncio.gather(*(webrtc_caller(session, url, plan, i, questions)
                                                    for i in range(n)))
                resources = sampler.stop()
                if server is None:
                    resources["note"] = "CPU/RSS of the benchmark process (the server is remote)"
                rows = [r for caller_rows in per_caller for r in caller_rows]
                report.add(summarize(n, rows, resources, args.slo_ms), rows, health.get("engines", {}))
                await asyncio.sleep(1.0)   # the calls' teardown leaves the server before the next N
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(30)


# ------------------------------------------------------------------ SIP callers (sipp) against the SIP service
def sipp_script(plan: Plan, index: int, questions: list, answer_s: float) -> tuple[np.ndarray, list[str]]:
    """One sipp caller's whole line as 16 kHz audio: its questions, each followed by ``answer_s`` seconds for
    the answer and a human pause, until the duration is used; and the questions' texts.

    sipp streams a file and cannot wait for the agent, so the schedule is fixed (open loop): an answer
    longer than ``answer_s`` is talked over by the next question.
    """
    rng = plan.rng(index)
    parts: list[np.ndarray] = []
    asked: list[str] = []
    total = 0.0
    q = index
    while not asked or total < plan.duration_s:
        text, _keys, pcm = questions[q % len(questions)]
        gap = np.zeros(int((answer_s + rng.uniform(*PAUSE_S)) * 16000), np.int16)
        parts += [pcm, gap]
        asked.append(text)
        total += (len(pcm) + len(gap)) / 16000
        q += 1
    return np.concatenate(parts), asked


async def run_sip(args, config, ns: list[int], report: Report) -> None:
    import tempfile

    from sub300.agent.audio import resample
    from sub300.agent.engines import load_engines, warm_up
    from sub300.agent.events import TurnDiscarded, TurnFailed, TurnFinished
    from sub300.media.sip import g711
    from sub300.media.sip.service import start_sip_service
    from tests.test_sip_support import Peer, RecordingObserver, scenario_call

    if shutil.which("sipp") is None:
        raise SystemExit("--transport sip needs sipp (Debian package sip-tester; scripts/setup.sh --test-deps)")
    config = config.model_copy(deep=True)
    config.sip.host, config.sip.port = "127.0.0.1", 0
    if not args.keep_admission:
        lift_admission(config, max(ns))
    engines = load_engines(config, progress=lambda m: print(f"# {m}", file=sys.stderr))
    await warm_up(engines, config)
    questions = speak_questions(engines.tts, len(QUESTIONS))
    if args.simultaneous:
        questions = padded_to_one_length(questions)
    observer = RecordingObserver()
    service = await start_sip_service(config, engines, observer)
    tmp = Path(tempfile.mkdtemp(prefix="bench_load_sip_"))
    try:
        for n in ns:
            plan = Plan(n, time.monotonic() + 1.0, args.duration_s, args.stagger_s, args.turn_timeout_s,
                        args.simultaneous, args.seed)
            before = set(observer.calls)
            asked: list[str] = []
            peers: list[Peer] = []
            sampler = Sampler(os.getpid())
            sampler.start()
            try:
                for i in range(n):
                    pcm, texts = sipp_script(plan, i, questions, args.sip_answer_s)
                    asked += texts
                    ulaw = tmp / f"n{n}_c{i}.ulaw"
                    ulaw.write_bytes(g711.encode("PCMU", resample(pcm, 16000, 8000)))
                    bye_ms = int((len(pcm) / 16000 + args.sip_answer_s) * 1000)
                    scenario = tmp / f"n{n}_c{i}.xml"
                    scenario.write_text(scenario_call(str(ulaw), then="bye_after", bye_after_ms=bye_ms))
                    await asyncio.sleep(max(0.0, plan.start_of(i) - time.monotonic()))
                    peers.append(Peer(["sipp", "-sf", str(scenario), "-i", "127.0.0.1", "-mi", "127.0.0.1",
                                       "-p", "0", "-m", "1", "-nostdin", "-timeout", f"{bye_ms // 1000 + 60}s",
                                       "-timeout_error", f"{service.address[0]}:{service.address[1]}"],
                                      cwd=str(tmp), log_path=str(tmp / f"n{n}_c{i}.out")))
                codes = [await peer.wait(args.duration_s + args.sip_answer_s + 120) for peer in peers]
                await observer.wait_ended(len(before) + n, timeout=30)
            finally:
                for peer in peers:
                    peer.stop()
            resources = sampler.stop()
            rows: list[TurnRow] = []
            for caller, call_id in enumerate(sorted(set(observer.calls) - before)):
                for event in observer.calls[call_id].events:
                    if isinstance(event, TurnFinished):
                        ledger = event.ledger
                        rows.append(TurnRow(n, caller, event.transcript, "answered", ledger.voice_to_voice_ms,
                                            dict(ledger.queue_ms), dict(ledger.work_ms),
                                            {k: round(v, 1) for k, v in ledger.stages_ms().items()},
                                            event.transcript))
                    elif isinstance(event, TurnFailed):
                        rows.append(TurnRow(n, caller, "", "failed", detail=event.error))
                    elif isinstance(event, TurnDiscarded):
                        rows.append(TurnRow(n, caller, "", "discarded", detail=event.reason))
            # a question that produced no turn at all (merged with another, lost, the call refused) is unanswered
            rows += [TurnRow(n, -1, "", "timeout", detail="no turn for this question")
                     for _ in range(max(0, len(asked) - len(rows)))]
            bad = [c for c in codes if c != 0]
            if bad:
                print(f"# N={n}: {len(bad)} sipp call(s) ended with an error (logs in {tmp})", file=sys.stderr)
            report.add(summarize(n, rows, resources, args.slo_ms), rows, engines.describe())
    finally:
        await service.close()
        await engines.aclose()


# ------------------------------------------------------------------ statistics and reports
def _pct(values: list[float], q: float) -> float | None:
    """The q-th percentile, rounded; an infinite value (a turn not answered) counts as later than any other.
    numpy interpolates between a finite value and inf as nan (0 * inf) even at an exact rank, so inf is a
    huge finite number here, and a result past the largest finite value is inf again."""
    if not values:
        return None
    finite = [v for v in values if not math.isinf(v)]
    value = percentile([1e300 if math.isinf(v) and v > 0 else v for v in values], q)
    if not finite or value > max(finite):    # at or past the first turn not answered
        return math.inf
    return None if math.isnan(value) else round(value, 1)


def summarize(calls: int, rows: list[TurnRow], resources: dict, slos: list[float]) -> dict:
    """One N's figures; percentiles of voice-to-voice count unanswered turns as infinitely late."""
    latencies = [r.latency_ms for r in rows]
    outcomes = {o: sum(r.outcome == o for r in rows) for o in ("answered", "failed", "discarded", "timeout", "error")}
    answered = [r for r in rows if r.outcome == "answered"]
    queue = {}
    for stage in ENGINE_STAGES:
        waits = [r.queue_ms[stage] for r in answered if stage in r.queue_ms]
        queue[stage] = {"p50": _pct(waits, 50), "p95": _pct(waits, 95), "n": len(waits)}
    m2e = [r.mouth_to_ear_ms for r in answered if r.mouth_to_ear_ms is not None]
    summary = {
        "calls": calls,
        "turns": len(rows),
        **outcomes,
        "v2v_p50_ms": _pct(latencies, 50),
        "v2v_p95_ms": _pct(latencies, 95),
        "v2v_p99_ms": _pct(latencies, 99),
        "goodput": {str(int(slo)): (round(sum(x <= slo for x in latencies) / len(rows), 3) if rows else None)
                    for slo in slos},
        "queue_ms": queue,
        **resources,
    }
    if m2e:
        summary["mouth_to_ear_p50_ms"] = _pct(m2e, 50)
        summary["mouth_to_ear_p95_ms"] = _pct(m2e, 95)
    return summary


def capacity(summaries: list[dict], slo_ms: float) -> int:
    """The largest N whose p95 voice-to-voice holds ``slo_ms`` (0 when none does)."""
    held = [s["calls"] for s in summaries if s["v2v_p95_ms"] is not None and s["v2v_p95_ms"] <= slo_ms]
    return max(held, default=0)


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return "∞" if math.isinf(value) else f"{value:.0f}"


def format_row(s: dict, slos: list[float]) -> str:
    good = ", ".join(f"≤{slo:.0f}: {100 * s['goodput'][str(int(slo))]:.0f}%" if s["goodput"][str(int(slo))] is not None
                     else f"≤{slo:.0f}: –" for slo in slos)
    return (f"{s['answered']}/{s['turns']} answered, v2v p50 {_ms(s['v2v_p50_ms'])} p95 {_ms(s['v2v_p95_ms'])} "
            f"p99 {_ms(s['v2v_p99_ms'])} ms, goodput {good}, CPU {s['cpu_pct']} %")


def markdown(summaries: list[dict], slos: list[float], header: list[str]) -> str:
    has_m2e = any("mouth_to_ear_p50_ms" in s for s in summaries)
    has_gpu = any(s.get("gpu_util_max_pct") is not None for s in summaries)
    cols = ["calls", "turns answered / asked", "failed / timed out", "v2v p50", "p95", "p99"]
    cols += [f"goodput ≤{slo:.0f} ms" for slo in slos]
    cols += [f"{stage} queue p50 / p95" for stage in ENGINE_STAGES]
    if has_m2e:
        cols += ["mouth-to-ear p50 / p95"]
    cols += ["CPU % (100 = 1 core)", "peak RSS MiB"]
    if has_gpu:
        cols += ["GPU util mean / max %", "GPU mem max MiB"]
    lines = [*header, "", "| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    for s in summaries:
        cells = [str(s["calls"]), f"{s['answered']} / {s['turns']}",
                 f"{s['failed']} / {s['timeout'] + s['error']}",
                 _ms(s["v2v_p50_ms"]), _ms(s["v2v_p95_ms"]), _ms(s["v2v_p99_ms"])]
        for slo in slos:
            g = s["goodput"][str(int(slo))]
            cells.append("–" if g is None else f"{100 * g:.0f} %")
        for stage in ENGINE_STAGES:
            q = s["queue_ms"][stage]
            cells.append(f"{_ms(q['p50'])} / {_ms(q['p95'])}" if q["n"] else "–")
        if has_m2e:
            cells.append(f"{_ms(s.get('mouth_to_ear_p50_ms'))} / {_ms(s.get('mouth_to_ear_p95_ms'))}")
        cells += ["–" if s["cpu_pct"] is None else f"{s['cpu_pct']:.0f}", _ms(s["peak_rss_mib"])]
        if has_gpu:
            cells += [f"{_ms(s['gpu_util_mean_pct'])} / {_ms(s['gpu_util_max_pct'])}", _ms(s["gpu_mem_max_mib"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(path: Path, summaries: list[dict], slos: list[float], title: str) -> bool:
    """p50/p95 voice-to-voice against N with the SLO lines; False (and a message) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("# load.png not written: matplotlib is not installed (pip install 'sub300[bench]')", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [s["calls"] for s in summaries]
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, label, style in (("v2v_p50_ms", "p50", "o-"), ("v2v_p95_ms", "p95", "s-")):
        ys = [s[key] if s[key] is not None and not math.isinf(s[key]) else float("nan") for s in summaries]
        ax.plot(ns, ys, style, label=f"voice-to-voice {label}")
    for slo in slos:
        ax.axhline(slo, linestyle="--", color="red", alpha=0.6)
        ax.annotate(f"SLO {slo:.0f} ms", (ns[0], slo), textcoords="offset points", xytext=(2, 3),
                    color="red", fontsize=8)
    if len(ns) > 1 and max(ns) / min(ns) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("concurrent calls")
    ax.set_ylabel("voice-to-voice (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_list(text: str, kind=float) -> list:
    values = [kind(v) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"empty list: {text!r}")
    return values


class Report:
    """The run's outputs, rewritten after every N, so a run stopped by a time limit keeps the Ns it finished."""

    def __init__(self, args) -> None:
        self.args = args
        self.machine = describe_machine()
        self.date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        self.summaries: list[dict] = []
        self.rows: list[TurnRow] = []
        self.engines: dict = {}

    def add(self, summary: dict, rows: list[TurnRow], engines: dict) -> None:
        self.summaries.append(summary)
        self.rows += rows
        self.engines = engines
        print(f"# N={summary['calls']}: {format_row(summary, self.args.slo_ms)}", file=sys.stderr)
        self.write()

    @property
    def capacity(self) -> int:
        return capacity(self.summaries, self.args.slo_ms[0])

    def table(self) -> str:
        args = self.args
        mode = ("simultaneous (all stop speaking on one tick)" if args.simultaneous
                else f"starts spread over {args.stagger_s:g} s")
        header = [f"# Load: {args.transport} callers, {args.duration_s:g} s per N, {mode}, "
                  f"pauses 1-3 s (seed {args.seed})",
                  f"# {self.machine}",
                  f"# engines: {self.engines}",
                  f"# capacity (largest N with p95 ≤ {args.slo_ms[0]:.0f} ms): {self.capacity}",
                  "# voice-to-voice in ms; a turn not answered counts as infinitely late; "
                  "queue = the ledger's queue_ms (request → start of work)"]
        return markdown(self.summaries, args.slo_ms, header)

    def write(self, final: bool = False) -> None:
        args = self.args
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            doc = {"machine": self.machine, "date": self.date, "transport": args.transport,
                   "simultaneous": args.simultaneous, "complete": final, "args": vars(args), "engines": self.engines,
                   "capacity_calls": self.capacity, "slo_ms": args.slo_ms, "rows": self.summaries,
                   "turns": [asdict(r) for r in self.rows]}
            (out / "load.md").write_text(self.table() + "\n")
            (out / "load.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
            if final:
                plot(out / "load.png", self.summaries, args.slo_ms,
                     f"sub300 load ({args.transport}{', simultaneous' if args.simultaneous else ''})\n{self.machine}")
                print(f"# wrote {out}/load.md, load.json{', load.png' if (out / 'load.png').exists() else ''}",
                      file=sys.stderr)
        if args.write_capacity:
            capacity_doc = {"capacity_calls": self.capacity, "slo_ms": args.slo_ms[0], "machine": self.machine,
                            "date": self.date, "transport": args.transport}
            Path(args.write_capacity).write_text(json.dumps(capacity_doc, indent=1) + "\n")
            if final:
                print(f"# wrote {args.write_capacity}: {capacity_doc}", file=sys.stderr)


async def main_async(args) -> int:
    from sub300.agent.config import load_config

    config = load_config(args.config)
    ns = sorted(set(args.calls))
    report = Report(args)
    if args.transport == "inproc":
        await run_inproc(args, config, ns, report)
    elif args.transport == "webrtc":
        await run_webrtc(args, ns, report)
    else:
        await run_sip(args, config, ns, report)
    report.write(final=True)
    print(report.table())
    return 0 if any(s["answered"] for s in report.summaries) else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=lambda t: parse_list(t, int), default=[1, 2, 4, 8],
                        help="concurrent calls to measure, comma-separated (default 1,2,4,8)")
    parser.add_argument("--duration-s", type=float, default=60.0, help="how long each N is held (s)")
    parser.add_argument("--stagger-s", type=float, default=3.0,
                        help="callers' starts are spread evenly over this many seconds (s)")
    parser.add_argument("--simultaneous", action="store_true",
                        help="worst case: same start, same question length, all stop speaking at once")
    parser.add_argument("--slo-ms", type=parse_list, default=[1000.0],
                        help="voice-to-voice SLOs for goodput, comma-separated; the first decides capacity (ms)")
    parser.add_argument("--turn-timeout-s", type=float, default=30.0,
                        help="a turn not answered (and played) within this is a timeout (s)")
    parser.add_argument("--transport", choices=("inproc", "webrtc", "sip"), default="inproc")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--config", help="TOML configuration (inproc; the webrtc server uses its defaults)")
    parser.add_argument("--out", help="folder for load.md, load.json and load.png")
    parser.add_argument("--write-capacity", metavar="FILE", help="write the measured capacity as JSON for admission")
    parser.add_argument("--port", type=int, default=8312, help="webrtc: port of the server started here")
    parser.add_argument("--url", help="webrtc: an already running server (default: start `sub300 serve` here)")
    parser.add_argument("--keep-admission", action="store_true",
                        help="webrtc/sip: keep the server's admission limits (default: lifted to max N, guard off)")
    parser.add_argument("--sip-answer-s", type=float, default=8.0,
                        help="sip: seconds left for each answer before the pause and the next question (s)")
    sys.exit(asyncio.run(main_async(parser.parse_args())))


if __name__ == "__main__":
    main()
