"""scripts/bench_cluster.py's pure parts: the figures and the table from canned turns, the failure checks,
the nodes' configuration and the order the topologies take turns in (no server, no model)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_cluster
from bench_load import TurnRow

RESOURCES = {"cpu_pct": 80.0, "peak_rss_mib": 900.0}


def answered(v2v: float, network: dict[str, float] | None = None, queue: dict[str, float] | None = None) -> TurnRow:
    return TurnRow(2, 0, "q", "answered", v2v, queue_ms=queue or {"stt": 1.0, "llm": 2.0, "tts": 3.0},
                   work_ms={"stt": 10.0, "llm": 20.0, "tts": 30.0}, stages_ms={"stt": v2v / 10},
                   network_ms=network or {})


def test_network_share_is_the_sum_of_the_stage_p50s_over_turns_that_carry_them() -> None:
    rows = [answered(500.0, {"stt": 2.0, "llm": 4.0, "tts": 6.0}),
            answered(700.0, {"stt": 4.0, "llm": 6.0}),           # no tts network time in this one
            TurnRow(2, 1, "q", "timeout", detail="no answer")]
    s = bench_cluster.summarize_topology("split", 2, rows, RESOURCES, [1000.0])
    assert (s["topology"], s["calls"], s["turns"], s["answered"], s["timeout"]) == ("split", 2, 3, 2, 1)
    assert s["network_ms"]["stt"] == {"p50": 3.0, "p95": pytest.approx(3.9), "n": 2}
    assert s["network_ms"]["tts"]["n"] == 1 and s["network_ms"]["tts"]["p50"] == 6.0
    assert s["network_share_ms"] == 3.0 + 5.0 + 6.0
    assert s["v2v_p50_ms"] == 700.0          # the timeout counts as infinitely late
    assert math.isinf(s["v2v_p95_ms"])
    assert s["network_share_pct"] == pytest.approx(100 * 14.0 / 700.0, abs=0.1)
    table = bench_cluster.markdown([s], ["# header"])
    assert s["stages_p50_ms"] == {"stt": 60.0}
    assert ("| split | 2 | 2 / 3 | 0 / 1 | 700 | ∞ | 3 (2) | 5 (2) | 6 (1) | 14 (2 %) | 1 | 2 | 3 | 10 / 20 / 30 | 80 |"
            in table)


def test_no_network_time_is_a_dash_and_fails_only_the_split_topology() -> None:
    local = bench_cluster.summarize_topology("all-in-one", 1, [answered(600.0)], RESOURCES, [1000.0])
    assert local["network_share_ms"] is None and local["network_share_pct"] is None
    assert "| all-in-one | 1 | 1 / 1 | 0 / 0 | 600 | 600 | – | – | – | – |" in bench_cluster.markdown([local], [])
    assert bench_cluster.failures([local]) == []
    unmeasured = bench_cluster.summarize_topology("split", 1, [answered(650.0)], RESOURCES, [1000.0])
    assert bench_cluster.failures([local, unmeasured]) == [
        "split: no answered turn's ledger carries network_ms: the hop went unmeasured"]
    measured = bench_cluster.summarize_topology("split", 1, [answered(650.0, {"tts": 1.0})], RESOURCES, [1000.0])
    assert bench_cluster.failures([local, measured]) == []
    assert bench_cluster.coverage_warnings([local, measured]) == [
        "split N=1: stt network_ms in 0 of 1 answered turns", "split N=1: llm network_ms in 0 of 1 answered turns"]


def test_a_topology_that_answered_nothing_fails() -> None:
    silent = bench_cluster.summarize_topology("all-in-one", 2, [TurnRow(2, 0, "q", "error", detail="refused")],
                                              RESOURCES, [1000.0])
    assert bench_cluster.failures([silent]) == ["all-in-one answered no turn at N=2"]


def test_nodes_media_nodes_use_the_model_node_and_topologies_alternate() -> None:
    nodes = bench_cluster.topology_nodes(9000)
    assert [(n.name, n.role, n.port) for n in nodes] == [
        ("all-in-one", "all", 9000), ("model", "model", 9001), ("media-1", "media", 9002), ("media-2", "media", 9003)]
    assert bench_cluster.callers_urls(nodes, "split") == ["http://127.0.0.1:9002", "http://127.0.0.1:9003"]
    env = bench_cluster.node_env(nodes[2], "http://127.0.0.1:9001", Path("/tmp/s"))
    assert env["SUB300_SERVER_ROLE"] == "media" and env["SUB300_SIP_ENABLED"] == "false"
    assert {env[f"SUB300_{s}_ENGINE"] for s in ("STT", "LLM", "TTS")} == {"openai"}
    assert {env[f"SUB300_{s}_BASE_URL"] for s in ("STT", "LLM", "TTS")} == {"http://127.0.0.1:9001/v1"}
    assert "SUB300_STT_ENGINE" not in bench_cluster.node_env(nodes[1], "http://127.0.0.1:9001", Path("/tmp/s"))
    topologies = bench_cluster.TOPOLOGIES
    firsts = [bench_cluster.round_order(topologies, n, r, 2)[0] for n in range(2) for r in range(2)]
    assert firsts == ["all-in-one", "split", "all-in-one", "split"]
    assert [bench_cluster.round_order(topologies, n, 0, 1)[0] for n in range(2)] == ["all-in-one", "split"]


def test_split_minus_all_in_one_per_n() -> None:
    local = bench_cluster.summarize_topology("all-in-one", 1, [answered(600.0), answered(700.0)], RESOURCES, [1e3])
    split = bench_cluster.summarize_topology("split", 1, [answered(640.0, {"llm": 3.0}), answered(760.0)],
                                             RESOURCES, [1e3])
    lonely = bench_cluster.summarize_topology("split", 2, [answered(900.0)], RESOURCES, [1e3])
    assert bench_cluster.split_minus_all_in_one([local, split, lonely]) == [
        "N=1: split − all-in-one: v2v p50 +50 ms, p95 +59 ms; of which on the wire (network share p50): 3 ms"]
