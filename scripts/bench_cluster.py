#!/usr/bin/env python3
"""Beyond one machine, on loopback: two media nodes + one model node beside all-in-one, in one run.

Two topologies of real `sub300 serve` processes on 127.0.0.1 (each its own
port, SIP off, records and keys under an ``XDG_STATE_HOME`` of the run's own,
authentication off: loopback), all started at the beginning and kept up:

* ``all-in-one`` — one ``sub300 serve`` (``server.role = all``, the default);
* ``split`` — one model node (``server.role = model``, port P) serving its
  engines on ``/v1/audio/transcriptions``, ``/v1/chat/completions`` and
  ``/v1/audio/speech``, and two media nodes (``server.role = media``,
  ``stt/llm/tts.engine = openai``, ``base_url = http://127.0.0.1:P/v1``).

For each N in ``--calls``, N aiortc callers (scripts/bench_load.py's webrtc
transport: its `Plan` and `webrtc_caller`, the same questions, pauses and
staggered starts) are held on the line for ``--duration-s`` seconds per
topology; in ``split`` caller i calls media node i mod 2 (round robin: no
load balancer is needed for the benchmark, and none is in the path).  The
topologies take turns: each N is cut into ``--rounds`` rounds of
``duration / rounds`` seconds, and the topology that goes first alternates
from round to round, so both see the same shared machine.

Per topology and N: turns answered / asked, p50/p95 voice-to-voice (a turn
not answered counts as infinitely late, as in bench_load), the p50 of each
engine stage's ``network_ms`` (the ledger's wire time to a remote engine:
the time to the answer's first byte less the endpoint's own queue and work,
which it reports in its ``Server-Timing`` header; agent/ledger.py) with the
number of turns that carried it, their sum as the *network share* (ms and %
of the p50 voice-to-voice), each stage's queue p50 (``queue_ms``: on a media
node the local wait for a connection plus the model node's queue), and the
CPU of all the topology's processes (100 % = one core).

On a 2-core machine the figures show correctness and the cost of the hops,
not throughput: the model node and the media nodes share the same two cores,
so ``split`` can only add work (HTTP, audio encoding, three event loops).

Exit status 1 when a topology answered no turn at some N, or when no turn of
``split`` carried ``network_ms`` (the hop went unmeasured).

    .venv/bin/python scripts/bench_cluster.py --calls 1,2 --duration-s 40 --out /tmp/cluster
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_load import (  # noqa: E402
    Plan,
    Sampler,
    TurnRow,
    _ms,
    _pct,
    parse_list,
    start_server,
    summarize,
    webrtc_caller,
)
from bench_turns import QUESTIONS  # noqa: E402
from machine_info import describe_machine  # noqa: E402

from sub300.agent.ledger import ENGINE_STAGES  # noqa: E402

TOPOLOGIES = ("all-in-one", "split")
NOTE = ("on this 2-core machine every node shares the same two cores: the figures show correctness and the cost "
        "of the hops, not throughput")


# ------------------------------------------------------------------ the nodes
@dataclass(frozen=True)
class NodeSpec:
    """One `sub300 serve` process of a topology."""

    topology: str
    name: str
    role: str          # all | media | model
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def takes_calls(self) -> bool:
        return self.role in ("all", "media")


def topology_nodes(base_port: int) -> list[NodeSpec]:
    """all-in-one on ``base_port``; the model node on +1, the two media nodes on +2 and +3."""
    return [NodeSpec("all-in-one", "all-in-one", "all", base_port),
            NodeSpec("split", "model", "model", base_port + 1),
            NodeSpec("split", "media-1", "media", base_port + 2),
            NodeSpec("split", "media-2", "media", base_port + 3)]


def node_env(node: NodeSpec, model_url: str, state: Path) -> dict[str, str]:
    """The node's configuration as SUB300_* variables (agent/config.py: ``SUB300_<SECTION>_<KEY>``), on top of
    bench_load's (admission lifted, per-source call limits off, records in a database of the run's own)."""
    env = {"XDG_STATE_HOME": str(state / node.name), "SUB300_SERVER_ROLE": node.role,
           "SUB300_SIP_ENABLED": "false", "SUB300_AUTH_REQUIRED": "off",
           # every media node's requests come from 127.0.0.1 and no key: no per-source or per-key model limit
           "SUB300_AUTH_SOURCE_MODEL_REQUESTS_PER_MINUTE": "0", "SUB300_AUTH_KEY_MODEL_REQUESTS_PER_MINUTE": "0"}
    if node.role == "media":
        for stage in ENGINE_STAGES:
            env[f"SUB300_{stage.upper()}_ENGINE"] = "openai"
            env[f"SUB300_{stage.upper()}_BASE_URL"] = model_url + "/v1"
    return env


def callers_urls(nodes: list[NodeSpec], topology: str) -> list[str]:
    """The URLs callers of ``topology`` are spread over, round robin."""
    return [n.url for n in nodes if n.topology == topology and n.takes_calls]


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def wait_up(session, node: NodeSpec, process: subprocess.Popen, log: Path, timeout_s: float) -> dict:
    """/healthz's document once the node answers; SystemExit with its log's tail if it exits or never answers."""
    import aiohttp

    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise SystemExit(f"{node.name} ({node.role}) exited with {process.returncode} while starting:\n"
                             f"{log_tail(log)}")
        try:
            async with session.get(node.url + "/healthz") as r:
                if r.status == 200:
                    return await r.json()
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{node.name} ({node.role}) not healthy within {timeout_s:.0f} s:\n{log_tail(log)}")
        await asyncio.sleep(0.5)


# ------------------------------------------------------------------ statistics (pure: tests/test_bench_cluster.py)
def summarize_topology(topology: str, calls: int, rows: list[TurnRow], resources: dict,
                       slos: list[float]) -> dict:
    """bench_load's figures for one topology and N, plus the network parts.

    ``network_ms[stage]``: p50/p95 over the answered turns whose ledger carries that stage's network time,
    with their count ``n``; ``network_share_ms``: the sum of the stages' p50s (None when no stage has one);
    ``network_share_pct``: that sum as a share of the p50 voice-to-voice (%); ``work_ms[stage]``: the same
    over the ledger's ``work_ms`` (in split, the model node's work as its Server-Timing reports it);
    ``stages_p50_ms``: the p50 of each critical-path stage (a stage a turn lacks counts 0 ms).
    """
    summary = summarize(calls, rows, resources, slos)
    answered = [r for r in rows if r.outcome == "answered"]
    network, work = {}, {}
    for stage in ENGINE_STAGES:
        values = [r.network_ms[stage] for r in answered if stage in r.network_ms]
        network[stage] = {"p50": _pct(values, 50), "p95": _pct(values, 95), "n": len(values)}
        values = [r.work_ms[stage] for r in answered if stage in r.work_ms]
        work[stage] = {"p50": _pct(values, 50), "p95": _pct(values, 95), "n": len(values)}
    stage_names = sorted({name for r in answered for name in r.stages_ms})
    stages = {name: _pct([r.stages_ms.get(name, 0.0) for r in answered], 50) for name in stage_names}
    p50s = [network[s]["p50"] for s in ENGINE_STAGES if network[s]["p50"] is not None]
    share = round(sum(p50s), 1) if p50s else None
    v2v = summary["v2v_p50_ms"]
    pct = (round(100.0 * share / v2v, 1) if share is not None and v2v is not None and not math.isinf(v2v) and v2v > 0
           else None)
    return {"topology": topology, **summary, "network_ms": network, "network_share_ms": share,
            "network_share_pct": pct, "work_ms": work, "stages_p50_ms": stages}


def failures(summaries: list[dict]) -> list[str]:
    """Why the run does not count (empty when it does): a topology that answered no turn at some N, or a
    split topology whose ledgers carry no network time (the hop went unmeasured)."""
    problems = [f"{s['topology']} answered no turn at N={s['calls']}" for s in summaries if not s["answered"]]
    split = [s for s in summaries if s["topology"] == "split" and s["answered"]]
    if split and not any(s["network_ms"][stage]["n"] for s in split for stage in ENGINE_STAGES):
        problems.append("split: no answered turn's ledger carries network_ms: the hop went unmeasured")
    return problems


def coverage_warnings(summaries: list[dict]) -> list[str]:
    """Stages of the split topology whose network time is missing from some answered turns, and all-in-one
    turns that carry one (which would be a bug: nothing of it is remote)."""
    notes = []
    for s in summaries:
        for stage in ENGINE_STAGES:
            n = s["network_ms"][stage]["n"]
            if s["topology"] == "split" and s["answered"] and n < s["answered"]:
                notes.append(f"split N={s['calls']}: {stage} network_ms in {n} of {s['answered']} answered turns")
            if s["topology"] != "split" and n:
                notes.append(f"{s['topology']} N={s['calls']}: {stage} network_ms in {n} turns (nothing is remote)")
    return notes


def markdown(summaries: list[dict], header: list[str]) -> str:
    """The table: one line per topology and N."""
    cols = ["topology", "calls", "turns answered / asked", "failed / timed out", "v2v p50", "p95"]
    cols += [f"{stage} network p50 (turns)" for stage in ENGINE_STAGES]
    cols += ["network share p50 (% of v2v p50)"]
    cols += [f"{stage} queue p50" for stage in ENGINE_STAGES]
    cols += [f"work p50 {' / '.join(ENGINE_STAGES)}"]
    cols += ["CPU % (all its processes; 100 = 1 core)"]
    lines = [*header, "", "| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    for s in sorted(summaries, key=lambda s: (s["calls"], TOPOLOGIES.index(s["topology"])
                                              if s["topology"] in TOPOLOGIES else len(TOPOLOGIES))):
        cells = [s["topology"], str(s["calls"]), f"{s['answered']} / {s['turns']}",
                 f"{s['failed']} / {s['timeout'] + s['error']}", _ms(s["v2v_p50_ms"]), _ms(s["v2v_p95_ms"])]
        for stage in ENGINE_STAGES:
            net = s["network_ms"][stage]
            cells.append(f"{_ms(net['p50'])} ({net['n']})" if net["n"] else "–")
        share = s["network_share_ms"]
        pct = s["network_share_pct"]
        cells.append("–" if share is None else f"{share:.0f} ({'–' if pct is None else f'{pct:.0f} %'})")
        for stage in ENGINE_STAGES:
            q = s["queue_ms"][stage]
            cells.append(_ms(q["p50"]) if q["n"] else "–")
        cells.append(" / ".join(_ms(s["work_ms"][stage]["p50"]) for stage in ENGINE_STAGES))
        cells.append("–" if s.get("cpu_pct") is None else f"{s['cpu_pct']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def split_minus_all_in_one(summaries: list[dict]) -> list[str]:
    """Per N with both topologies: split's p50 and p95 voice-to-voice less all-in-one's (ms), beside split's
    network share, so the wire's part of the hops' cost can be read against their whole cost."""
    by = {(s["topology"], s["calls"]): s for s in summaries}
    lines = []
    for n in sorted({s["calls"] for s in summaries}):
        split, local = by.get(("split", n)), by.get(("all-in-one", n))
        if split is None or local is None:
            continue
        diffs = []
        for key in ("v2v_p50_ms", "v2v_p95_ms"):
            a, b = split[key], local[key]
            diffs.append("–" if a is None or b is None or math.isinf(a) or math.isinf(b) else f"{a - b:+.0f}")
        lines.append(f"N={n}: split − all-in-one: v2v p50 {diffs[0]} ms, p95 {diffs[1]} ms; "
                     f"of which on the wire (network share p50): {_ms(split['network_share_ms'])} ms")
    return lines


def merged_resources(parts: list[dict]) -> dict:
    """Several processes' Sampler figures as one topology's: CPU and peak RSS summed (an upper bound of the
    simultaneous peak)."""
    cpu = [p["cpu_pct"] for p in parts if p.get("cpu_pct") is not None]
    rss = [p["peak_rss_mib"] for p in parts if p.get("peak_rss_mib") is not None]
    return {"cpu_pct": round(sum(cpu), 1) if cpu else None, "peak_rss_mib": round(sum(rss), 1) if rss else None,
            "processes": len(parts)}


def round_order(topologies: tuple[str, ...], n_index: int, round_index: int, rounds: int) -> tuple[str, ...]:
    """Which topology goes first: alternates round after round, across the Ns too."""
    return topologies if (n_index * rounds + round_index) % 2 == 0 else topologies[::-1]


# ------------------------------------------------------------------ the run
class Report:
    """cluster.md / cluster.json, rewritten after every N, so a run stopped early keeps the Ns it finished."""

    def __init__(self, args) -> None:
        self.args = args
        self.machine = describe_machine()
        self.date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        self.summaries: list[dict] = []
        self.rows: dict[str, list[TurnRow]] = {t: [] for t in TOPOLOGIES}
        self.engines: dict[str, dict] = {}

    def header(self) -> list[str]:
        a = self.args
        lines = [f"# Cluster on loopback: all-in-one vs split (1 model node + 2 media nodes), aiortc callers, "
                 f"{a.duration_s:g} s per topology and N in {a.rounds} alternating round(s), starts spread over "
                 f"{a.stagger_s:g} s, pauses 1-3 s (seed {a.seed})",
                 f"# {self.machine}",
                 f"# run {self.date}; {NOTE}",
                 "# split: caller i calls media node i mod 2 (round robin, no load balancer in the path)",
                 "# voice-to-voice in ms, a turn not answered counts as infinitely late; network = the ledger's "
                 "network_ms (first byte - sent - the model node's Server-Timing queue and work); network share = "
                 "sum of the stages' p50s; queue = the ledger's queue_ms"]
        lines += [f"# engines, {name}: {engines}" for name, engines in self.engines.items()]
        return lines

    def table(self) -> str:
        deltas = split_minus_all_in_one(self.summaries)
        return markdown(self.summaries, self.header()) + "".join(f"\n\n{line}" if i == 0 else f"\n{line}"
                                                                 for i, line in enumerate(deltas))

    def add(self, summary: dict, rows: list[TurnRow]) -> None:
        self.summaries.append(summary)
        self.rows[summary["topology"]] += rows
        print(f"# {summary['topology']} N={summary['calls']}: {summary['answered']}/{summary['turns']} answered, "
              f"v2v p50 {_ms(summary['v2v_p50_ms'])} p95 {_ms(summary['v2v_p95_ms'])} ms, network share "
              f"{_ms(summary['network_share_ms'])} ms", file=sys.stderr)
        self.write()

    def write(self, final: bool = False) -> None:
        if not self.args.out:
            return
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        doc = {"machine": self.machine, "date": self.date, "note": NOTE, "complete": final, "args": vars(self.args),
               "engines": self.engines, "rows": self.summaries, "failures": failures(self.summaries),
               "turns": {t: [asdict(r) for r in rows] for t, rows in self.rows.items()}}
        (out / "cluster.md").write_text(self.table() + "\n")
        (out / "cluster.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        if final:
            print(f"# wrote {out}/cluster.md, cluster.json", file=sys.stderr)


async def one_round(session, urls: list[str], n: int, duration_s: float, args, questions) -> list[TurnRow]:
    """N callers spread round robin over ``urls``, held ``duration_s`` (bench_load's webrtc callers)."""
    plan = Plan(n, time.monotonic() + 0.5, duration_s, args.stagger_s, args.turn_timeout_s, False, args.seed)
    per_caller = await asyncio.gather(*(webrtc_caller(session, urls[i % len(urls)], plan, i, questions)
                                        for i in range(n)))
    await asyncio.sleep(1.0)   # the calls' teardown leaves the servers before the next round
    return [r for caller_rows in per_caller for r in caller_rows]


async def run(args, report: Report) -> None:
    import aiohttp
    from bench_webrtc import LEAD_S, TAIL_S

    from tests.speech import compose, speak

    print("# making questions with Piper…", file=sys.stderr)
    questions = [(t, k, compose(LEAD_S, speak(t), TAIL_S)) for t, k in QUESTIONS]
    ns = sorted(set(args.calls))
    state = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    topologies = tuple(args.topologies)
    nodes = [node for node in topology_nodes(args.port) if node.topology in topologies]
    model_url = f"http://127.0.0.1:{args.port + 1}"
    processes: dict[str, subprocess.Popen] = {}
    logs = {node.name: state / f"{node.name}.log" for node in nodes}
    print(f"# nodes' logs and state in {state}", file=sys.stderr)
    try:
        for node in nodes:
            processes[node.name] = start_server(node.port, max(ns), False, node_env(node, model_url, state),
                                                log=logs[node.name])
        async with aiohttp.ClientSession() as session:
            for node in nodes:
                health = await wait_up(session, node, processes[node.name], logs[node.name], args.start_timeout_s)
                report.engines[node.name] = health.get("engines", {})
            urls = {t: callers_urls(nodes, t) for t in topologies}
            for n_index, n in enumerate(ns):
                rows: dict[str, list[TurnRow]] = {t: [] for t in topologies}
                resources: dict[str, list[dict]] = {t: [] for t in topologies}
                for r in range(args.rounds):
                    for topology in round_order(topologies, n_index, r, args.rounds):
                        dead = [n for n in nodes if n.topology == topology and processes[n.name].poll() is not None]
                        if dead:
                            raise SystemExit(f"{dead[0].name} exited ({processes[dead[0].name].returncode}):\n"
                                             f"{log_tail(logs[dead[0].name])}")
                        samplers = [Sampler(processes[node.name].pid) for node in nodes if node.topology == topology]
                        for sampler in samplers:
                            sampler.start()
                        rows[topology] += await one_round(session, urls[topology], n, args.duration_s / args.rounds,
                                                          args, questions)
                        resources[topology].append(merged_resources([s.stop() for s in samplers]))
                for topology in topologies:
                    cpu = [x["cpu_pct"] for x in resources[topology] if x["cpu_pct"] is not None]
                    merged = {"cpu_pct": round(sum(cpu) / len(cpu), 1) if cpu else None,
                              "peak_rss_mib": max((x["peak_rss_mib"] or 0.0 for x in resources[topology]),
                                                  default=None),
                              "processes": resources[topology][0]["processes"]}
                    report.add(summarize_topology(topology, n, rows[topology], merged, args.slo_ms), rows[topology])
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, process in processes.items():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                print(f"# {name} did not stop within 60 s of SIGTERM: killed", file=sys.stderr)
                process.kill()
                process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=lambda t: parse_list(t, int), default=[1, 2],
                        help="concurrent calls (total over the topology's media nodes), comma-separated (default 1,2)")
    parser.add_argument("--duration-s", type=float, default=40.0, help="how long each topology holds each N (s)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds per N, the topologies alternating which goes first (default 2)")
    parser.add_argument("--stagger-s", type=float, default=3.0, help="callers' starts spread over this (s)")
    parser.add_argument("--turn-timeout-s", type=float, default=30.0, help="a turn not answered within this (s)")
    parser.add_argument("--slo-ms", type=parse_list, default=[1000.0], help="goodput SLOs, in cluster.json (ms)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--port", type=int, default=8350,
                        help="all-in-one's port; the model node's is +1, the media nodes' +2 and +3")
    parser.add_argument("--start-timeout-s", type=float, default=300.0,
                        help="how long a node may take to load its engines and answer /healthz (s)")
    parser.add_argument("--topologies", type=lambda t: parse_list(t, str), default=list(TOPOLOGIES),
                        help="comma-separated, of all-in-one,split (default both; one alone is for development)")
    parser.add_argument("--out", help="folder for cluster.md and cluster.json")
    args = parser.parse_args()
    unknown = set(args.topologies) - set(TOPOLOGIES)
    if unknown or len(set(args.topologies)) != len(args.topologies):
        parser.error(f"--topologies: each of {', '.join(TOPOLOGIES)} at most once (got {args.topologies})")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    report = Report(args)
    asyncio.run(run(args, report))
    report.write(final=True)
    print(report.table())
    for note in coverage_warnings(report.summaries):
        print(f"# note: {note}", file=sys.stderr)
    problems = failures(report.summaries)
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
