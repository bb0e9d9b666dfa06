"""When the early final starts (agent/transcription.py, issue 11): at the silence onset, before the detector's pause.

A real `Endpointer` on a scripted fake VAD that, like webrtcvad, keeps
calling frames voiced 100 ms after the voice; the `UtteranceTranscriber`
driven frame by frame as the conversation drives it; a `FakeStt` on virtual
time (looptime) records when each transcription started and how much audio
it got.  The voice ends at 1.0 s.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

import sub300.agent.transcription as transcription
from sub300.agent.audio_ring import AudioRing
from sub300.agent.endpointing import Endpointer, SpeechEnded, SpeechPaused, SpeechResumed
from sub300.agent.tasks import TaskOwner
from sub300.agent.transcription import UtteranceTranscriber
from sub300.models.protocols import SAMPLE_RATE
from sub300.testing.fakes import FRAME, FakeStt, FakeVad, speech

pytest.importorskip("looptime", reason="virtual time needs the test extra (looptime)")

VOICE_END = 1.0
TAIL_MS = 100


def caller(*, gap: tuple[float, float] | None = None, soft_tail_db: float | None = None):
    """(pcm, voiced flags): 0.3 s of digital silence, speech to 1.0 s (a silent ``gap`` inside it, in
    seconds), 0.8 s of silence; ``soft_tail_db``: 60 ms of a soft sound that many dB under the speech
    20 ms after its end (below the endpointer's 40 dB floor, so the detector and the end stay put)."""
    pcm = np.concatenate([np.zeros(int(0.3 * SAMPLE_RATE)), speech(VOICE_END - 0.3, level=8000),
                          np.zeros(int(0.8 * SAMPLE_RATE))])
    if gap is not None:
        pcm[int(gap[0] * SAMPLE_RATE): int(gap[1] * SAMPLE_RATE)] = 0
    if soft_tail_db is not None:
        start = int((VOICE_END + 0.02) * SAMPLE_RATE)
        rng = np.random.default_rng(1)
        pcm[start: start + int(0.06 * SAMPLE_RATE)] = rng.normal(0, 8000 * 10 ** (-soft_tail_db / 20),
                                                                 int(0.06 * SAMPLE_RATE))
    pcm = pcm.astype(np.int16)
    frames = len(pcm) // FRAME
    last_voiced = int(VOICE_END * SAMPLE_RATE) // FRAME + 5          # the detector's own 100 ms hangover
    voiced = [int(0.3 * SAMPLE_RATE) // FRAME <= k < last_voiced for k in range(frames)]
    return pcm, voiced


async def run(pcm, voiced, *, onset_ms: int | None = None) -> tuple[FakeStt, list, float]:
    """Play ``pcm`` in real (virtual) time; (stt, the turn's final transcription and whether it was the
    early one, the true end of speech on the clock)."""
    loop = asyncio.get_running_loop()
    stt = FakeStt("hello there", delay_s=0.1)
    ring = AudioRing(10 * SAMPLE_RATE)
    ep = Endpointer(FakeVad(voiced), min_speech_ms=100, hangover_ms=250)
    owner = TaskOwner("turn")
    t0 = loop.time()
    transcriber = None
    final = None
    speech_end = None
    for i in range(0, len(pcm) - FRAME + 1, FRAME):
        await asyncio.sleep(FRAME / SAMPLE_RATE)      # the frame's last sample arrives now
        frame = pcm[i:i + FRAME]
        ring.append(frame)
        for event in ep.feed(frame, loop.time()):
            if transcriber is None and ep.in_speech:
                transcriber = UtteranceTranscriber(
                    stt=stt, ring=ring, endpointer=ep, start_sample=0, owner=owner, clock=loop.time,
                    early_final=True, partial_interval_s=0, on_early_final=lambda _t, _text: None,
                    on_partial=lambda _text: None, on_stale=lambda: None, tail_samples=TAIL_MS * 16,
                    silence_onset_ms=onset_ms)
            if isinstance(event, SpeechPaused) and transcriber is not None:
                transcriber.speech_paused()
            if isinstance(event, SpeechResumed) and transcriber is not None:
                transcriber.speech_resumed()
            if isinstance(event, SpeechEnded) and transcriber is not None:
                final = transcriber.final(event.end_sample)
                speech_end = event.speech_end
        if transcriber is not None and final is None:
            transcriber.tick()
    assert final is not None and speech_end is not None
    await final[0].task
    await owner.aclose()
    return stt, [final[1], final[0].end_sample], speech_end - t0


@pytest.mark.looptime
async def test_the_early_final_starts_at_the_silence_onset_padded_to_the_tail_and_is_the_final():
    pcm, voiced = caller()
    stt, (early, _end), speech_end = await run(pcm, voiced)
    assert early and len(stt.calls) == 1
    started, seconds = stt.calls[0]
    # 40 ms of quiet blocks + one 20 ms frame after the true end; the detector paused ~100 ms later
    assert speech_end == pytest.approx(VOICE_END, abs=0.011)
    assert started - VOICE_END <= 0.061 + 1e-6
    # what Whisper gets: all the speech and the tail (digital silence after the audio there was)
    assert seconds >= VOICE_END + TAIL_MS / 1000 - 0.011


@pytest.mark.looptime
async def test_waiting_for_the_detector_and_the_tail_as_before_starts_later():
    pcm, voiced = caller()
    before = transcription.START_BEFORE_TAIL
    transcription.START_BEFORE_TAIL = False
    try:
        stt, (early, _end), _speech_end = await run(pcm, voiced)
    finally:
        transcription.START_BEFORE_TAIL = before
    assert early and len(stt.calls) == 1
    assert stt.calls[0][0] - VOICE_END >= 0.1 - 1e-6


@pytest.mark.looptime
async def test_a_soft_sound_in_the_tail_launches_the_early_final_again_with_it():
    pcm, voiced = caller(soft_tail_db=45.0)
    stt, (early, end_sample), _speech_end = await run(pcm, voiced)
    assert early and len(stt.calls) == 2
    assert end_sample >= (VOICE_END + TAIL_MS / 1000) * SAMPLE_RATE    # the final holds the tail's audio
    # a sound 60 dB under the speech is no sound: one transcription
    pcm, voiced = caller(soft_tail_db=60.0)
    stt, (early, _end), _speech_end = await run(pcm, voiced)
    assert early and len(stt.calls) == 1


@pytest.mark.looptime
async def test_a_silent_gap_inside_the_speech_is_only_a_partial():
    pcm, voiced = caller(gap=(0.6, 0.68))        # 80 ms of silence; the detector does not pause
    stt, (early, _end), _speech_end = await run(pcm, voiced)
    assert early and len(stt.calls) == 2
    assert stt.calls[0][0] < 0.7 and stt.calls[1][0] >= VOICE_END
    assert stt.calls[0][1] < 0.8                  # the gap's transcription had only the speech before it
