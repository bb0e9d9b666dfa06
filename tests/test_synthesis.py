"""models/synthesis.py: what Piper and Coqui share (int16 conversion, failures as ModelError, a close passing)."""
from __future__ import annotations

import numpy as np
import pytest

from sub300.models.protocols import ModelError
from sub300.models.synthesis import float_to_int16, synthesis_errors


def test_float_audio_is_clipped_into_int16():
    out = float_to_int16(np.array([0.0, 0.5, 1.0, 2.0, -3.0], np.float32))
    assert out.dtype == np.int16 and out.tolist() == [0, 16383, 32767, 32767, -32767]


def test_a_failure_names_the_engine_and_the_text_and_a_model_error_passes_as_it_is():
    with pytest.raises(ModelError, match=r"^Coqui synthesis failed for 'Hello there\.': boom$"), \
            synthesis_errors("Coqui", "Hello there."):
        raise RuntimeError("boom")
    original = ModelError("tools_unsupported")
    with pytest.raises(ModelError) as caught, synthesis_errors("Piper", "x"):
        raise original
    assert caught.value is original


def test_closing_the_generator_inside_is_not_a_failure():
    def chunks():
        with synthesis_errors("Piper", "text"):
            yield from range(3)

    stream = chunks()
    assert next(stream) == 0
    stream.close()                        # GeneratorExit passes through: no ModelError raised
