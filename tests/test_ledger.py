from __future__ import annotations

import pytest

from sub300.agent.ledger import MARKS, TurnLedger


def ledger_with(**marks: float) -> TurnLedger:
    ledger = TurnLedger(1)
    for name, at in marks.items():
        ledger.mark(name, at)
    return ledger


def test_stages_sum_to_voice_to_voice():
    ledger = ledger_with(speech_end=10.0, endpoint=10.25, stt_final=10.40, llm_first_token=10.52,
                         first_piece=10.70, tts_first_audio=10.85, first_audio_out=10.87)
    stages = ledger.stages_ms()
    assert list(stages) == ["endpointing", "stt", "llm_first_token", "first_piece", "tts_first_audio", "send"]
    assert stages["endpointing"] == pytest.approx(250)
    assert stages["stt"] == pytest.approx(150)
    assert sum(stages.values()) == pytest.approx(ledger.voice_to_voice_ms) == pytest.approx(870)


def test_early_transcription_counts_as_overlap_not_twice():
    ledger = ledger_with(speech_end=10.0, stt_start=10.02, stt_final=10.20, endpoint=10.25,
                         llm_first_token=10.40, first_piece=10.5, tts_first_audio=10.6, first_audio_out=10.61)
    assert ledger.stages_ms()["stt"] == 0
    assert ledger.overlaps_ms()["stt_before_endpoint"] == pytest.approx(230)
    assert sum(ledger.stages_ms().values()) == pytest.approx(ledger.voice_to_voice_ms)


def test_first_mark_wins_and_unknown_marks_are_refused():
    ledger = ledger_with(speech_end=1.0)
    ledger.mark("speech_end", 2.0)
    assert ledger.marks["speech_end"] == 1.0
    with pytest.raises(KeyError):
        ledger.mark("speech_ended", 1.0)


def test_relative_marks_and_dict():
    ledger = ledger_with(speech_start=8.0, speech_end=10.0, endpoint=10.25, first_audio_out=11.0)
    rel = ledger.relative_marks_ms()
    assert rel == {"speech_start": -2000.0, "speech_end": 0.0, "endpoint": 250.0, "first_audio_out": 1000.0}
    assert list(rel) == [m for m in MARKS if m in rel]
    doc = ledger.to_dict()
    assert doc["voice_to_voice_ms"] == 1000.0
    # missing stages stop the critical path rather than inventing numbers
    assert doc["stages_ms"] == {"endpointing": 250.0}


def test_table_mentions_budget():
    ledger = ledger_with(speech_end=0.0, endpoint=0.1, stt_final=0.1, llm_first_token=0.1,
                         first_piece=0.1, tts_first_audio=0.1, first_audio_out=0.4)
    assert "over the 300 ms budget" in ledger.format_table(300)


def test_the_latency_page_draws_every_critical_path_stage_in_the_ledgers_order():
    import re
    from pathlib import Path

    from sub300.agent.ledger import STAGES

    page = (Path(__file__).resolve().parent.parent / "web" / "static" / "latency.js").read_text()
    block = page.split("export const STAGES = [", 1)[1].split("];", 1)[0]
    assert re.findall(r'\["(\w+)",', block) == [stage for stage, _ in STAGES]
    css = (Path(__file__).resolve().parent.parent / "web" / "static" / "style.css").read_text()
    assert all(f"--{stage}:" in css for stage, _ in STAGES)   # each stage has its colour
