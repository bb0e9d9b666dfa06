"""ONNX Runtime device selection (models/onnx.py): CUDA provider only when it exists, a GPU is visible and
the configuration allows it; every CPU choice with a GPU in sight is logged, a failed CUDA start is never silent.

The providers and the GPU count are monkeypatched: no GPU is needed.
"""
from __future__ import annotations

import logging

import onnxruntime
import pytest

from sub300.models import device as ct2_device
from sub300.models import onnx
from sub300.models.protocols import ModelUnavailable

CUDA, CPU = onnx.CUDA_PROVIDER, onnx.CPU_PROVIDER


@pytest.fixture
def machine(monkeypatch):
    """Set what onnxruntime offers and how many GPUs are visible."""
    def set_machine(providers: list[str], gpus: int) -> None:
        monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(providers))
        monkeypatch.setattr(ct2_device, "cuda_device_count", lambda: gpus)
    return set_machine


def test_auto_uses_cuda_when_provider_and_gpu_exist(machine, caplog):
    machine([CUDA, CPU], gpus=1)
    with caplog.at_level(logging.INFO, logger="sub300.models.onnx"):
        placement = onnx.select_providers("Piper voice", "auto")
    assert placement.device == "cuda"
    assert placement.providers[0] == (CUDA, {"cudnn_conv_algo_search": "HEURISTIC"})
    assert placement.providers[-1] == CPU
    assert "Piper voice runs on cuda" in caplog.text


def test_auto_with_a_gpu_but_cpu_onnxruntime_warns_and_uses_cpu(machine, caplog):
    machine(["AzureExecutionProvider", CPU], gpus=1)
    with caplog.at_level(logging.INFO, logger="sub300.models.onnx"):
        placement = onnx.select_providers("Silero VAD model", "auto")
    assert placement == onnx.OnnxPlacement("cpu", (CPU,))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "onnxruntime-gpu" in warnings[0].getMessage()


@pytest.mark.parametrize("providers, gpus, configured", [
    ([CUDA, CPU], 0, "auto"),      # the GPU wheel on a machine without a GPU
    ([CPU], 0, "auto"),
    ([CUDA, CPU], 1, "cpu"),       # the configuration keeps it on the CPU
])
def test_cpu_choices_are_logged(machine, caplog, providers, gpus, configured):
    machine(providers, gpus)
    with caplog.at_level(logging.INFO, logger="sub300.models.onnx"):
        assert onnx.select_providers("Piper voice", configured).device == "cpu"
    assert "Piper voice runs on cpu" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("providers, gpus, reason", [
    ([CPU], 1, "install onnxruntime-gpu"),
    ([CUDA, CPU], 0, "no CUDA device is visible"),
])
def test_cuda_required_but_unavailable_is_an_error(machine, providers, gpus, reason):
    machine(providers, gpus)
    with pytest.raises(ModelUnavailable, match=reason):
        onnx.select_providers("Piper voice", "cuda")


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="auto, cpu, cuda"):
        onnx.select_providers("Piper voice", "gpu")


class _FellBackSession:
    """An InferenceSession whose CUDA provider failed to start (ONNX Runtime then runs on the CPU)."""

    def __init__(self, path, sess_options=None, providers=None):
        self.asked = providers

    def get_providers(self):
        return [CPU]


def test_onnx_runtime_falling_back_to_cpu_is_visible(machine, monkeypatch, caplog, tmp_path):
    machine([CUDA, CPU], gpus=1)
    monkeypatch.setattr(onnxruntime, "InferenceSession", _FellBackSession)
    with caplog.at_level(logging.WARNING, logger="sub300.models.onnx"):
        session = onnx.onnx_session(tmp_path / "voice.onnx", "Piper voice", device="auto")
    assert session.asked[0][0] == CUDA
    assert onnx.session_device(session) == "cpu"
    assert "could not start its CUDA provider" in caplog.text
    with pytest.raises(ModelUnavailable, match="could not start its CUDA provider"):
        onnx.onnx_session(tmp_path / "voice.onnx", "Piper voice", device="cuda")


def test_configured_vad_device_reaches_silero(machine):
    from sub300.agent.config import load_config, override
    from sub300.agent.engines import VAD_ENGINES

    machine([CUDA, CPU], gpus=1)   # a GPU is there, but the configuration says cpu
    config = override(load_config(environ={}), {"vad": {"engine": "silero", "device": "cpu"}}, origin="test")
    vad = VAD_ENGINES["silero"](config)
    assert vad.device == "cpu"
    assert "device='cpu'" in repr(vad)
