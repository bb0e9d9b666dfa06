"""The seam after a piece cut inside a sentence (agent/reply.py): its trailing silence is trimmed; every
piece's leading silence is trimmed too."""
from __future__ import annotations

import numpy as np

from sub300.agent.reply import (
    _PAUSE_END,
    LEAD_KEEP_MS,
    SEAM_HOLD_MS,
    SEAM_KEEP_MS,
    SeamHold,
    trim_leading_silence,
    trim_trailing_silence,
)
from sub300.testing.fakes import tone

RATE = 22050


def test_the_silence_after_the_last_sound_is_cut_to_the_kept_seam():
    voice = tone(300, RATE)
    breath = (tone(20, RATE) * 10 ** (-30 / 20)).astype(np.int16)     # a soft end 30 dB under: kept
    pcm = np.concatenate([np.zeros(RATE // 25, np.int16), voice, breath, np.zeros(RATE // 5, np.int16)])
    out = trim_trailing_silence(pcm, RATE)
    end_of_sound = RATE // 25 + len(voice) + len(breath)
    assert end_of_sound <= len(out) <= end_of_sound + RATE * (SEAM_KEEP_MS + 10) // 1000
    assert np.array_equal(out, pcm[: len(out)])
    assert len(trim_trailing_silence(np.zeros(0, np.int16), RATE)) == 0


def test_only_a_piece_that_stops_where_nobody_pauses_is_trimmed():
    assert not _PAUSE_END.search("The capital of")
    for piece in ("The capital of France is Paris.", "A day is 24 hours,", 'He said "yes."', "Well;", "Really?"):
        assert _PAUSE_END.search(piece), piece


def test_the_silence_before_the_first_sound_is_cut_to_the_kept_lead():
    lead = RATE * 40 // 1000                                            # Piper's ~40 ms under -55 dBFS
    hiss = (tone(40, RATE) * 10 ** (-60 / 20)).astype(np.int16)        # 60 dB under the voice: silence
    voice = tone(300, RATE)
    pcm = np.concatenate([hiss[:lead], voice, np.zeros(RATE // 10, np.int16)])
    out = trim_leading_silence(pcm, RATE)
    assert np.array_equal(out, pcm[len(pcm) - len(out):])              # only the front goes
    assert lead - RATE * (LEAD_KEEP_MS + 10) // 1000 <= len(pcm) - len(out) <= lead   # the voice is intact
    assert len(trim_leading_silence(np.zeros(0, np.int16), RATE)) == 0
    assert np.array_equal(trim_leading_silence(voice, RATE), voice)      # sound from the start: untouched


def a_piece() -> np.ndarray:
    """Half a second of voice with a soft end, then Piper's 200 ms of trailing silence."""
    breath = (tone(20, RATE) * 10 ** (-30 / 20)).astype(np.int16)
    return np.concatenate([tone(500, RATE), breath, np.zeros(RATE // 5, np.int16)])


def test_a_one_chunk_piece_is_trimmed_as_before_the_hold():
    piece = a_piece()
    seam = SeamHold(RATE)
    now = seam.add(piece)
    held = len(piece) - len(now)                                        # all but the held tail, at once
    assert RATE * SEAM_HOLD_MS // 1000 <= held < RATE * SEAM_HOLD_MS // 1000 + RATE // 100
    np.testing.assert_array_equal(np.concatenate([now, seam.end()]), trim_trailing_silence(piece, RATE))


def test_a_streamed_piece_goes_on_chunk_by_chunk_and_ends_trimmed_the_same():
    piece = a_piece()
    seam = SeamHold(RATE)
    parts = [seam.add(chunk) for chunk in np.array_split(piece, 5)]
    assert [len(p) > 0 for p in parts] == [False, False, True, True, True]   # 144 ms each: 400 ms held
    out = np.concatenate([*parts, seam.end()])
    np.testing.assert_array_equal(out, trim_trailing_silence(piece, RATE))
    quiet_tail = SeamHold(RATE)
    quiet_tail.add(tone(300, RATE))
    quiet_tail.add(np.zeros(RATE // 2, np.int16))                        # the held tail is all silence
    assert len(quiet_tail.end()) == RATE * SEAM_KEEP_MS // 1000
