"""The seam after a piece cut inside a sentence (agent/reply.py): its trailing silence is trimmed."""
from __future__ import annotations

import numpy as np

from sub300.agent.reply import _PAUSE_END, SEAM_KEEP_MS, trim_trailing_silence
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
