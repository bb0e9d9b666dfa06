"""TINY Coqui models with RANDOM weights, built with Coqui's own classes, for tests and plumbing benchmarks.

No Coqui voice can be fetched here, so the tests and ``scripts/bench_tts_engines.py`` build a
model of the real architecture, far smaller and untrained, save it to a folder in the layout
of a real download (``config.json`` + ``model.pth``) and load it back through sub300's Coqui
engine by path.  Its audio is noise: assert shapes, rates, durations, streaming order and
cancellation, never words; time it only as the engine's plumbing cost, never as a voice.
"""
from __future__ import annotations

from pathlib import Path

#: the tiny VITS's output rate (Hz) and its decoder's samples per frame
TINY_VITS_SAMPLE_RATE = 16_000
TINY_VITS_HOP_LENGTH = 256


def build_tiny_vits(folder: Path, *, seed: int = 0) -> Path:
    """Write a random-weight VITS (about 260 k parameters, 1 MB) into ``folder``; returns ``folder``.

    Deterministic: the same ``seed`` gives the same weights, and with ``inference_noise_scale``
    0 and the deterministic duration predictor (``use_sdp`` False) the same text gives the
    same audio, ``TINY_VITS_HOP_LENGTH`` samples per predicted frame at ``TINY_VITS_SAMPLE_RATE``.
    Characters only (no phonemizer), English cleaners.  Needs the ``sub300[coqui]`` extra."""
    import torch
    from TTS.tts.configs.vits_config import VitsArgs, VitsConfig
    from TTS.tts.models.vits import Vits

    torch.manual_seed(seed)
    args = VitsArgs(
        hidden_channels=16, hidden_channels_ffn_text_encoder=32, num_heads_text_encoder=2,
        num_layers_text_encoder=1, num_layers_flow=1, num_layers_posterior_encoder=1,
        use_sdp=False, inference_noise_scale=0.0, init_discriminator=False,
        resblock_type_decoder="2", resblock_kernel_sizes_decoder=[3], resblock_dilation_sizes_decoder=[[1, 3]],
        # the decoder upsamples each frame by 8 * 8 * 4 = TINY_VITS_HOP_LENGTH samples
        upsample_rates_decoder=[8, 8, 4], upsample_initial_channel_decoder=32, upsample_kernel_sizes_decoder=[16, 16, 8],
    )
    config = VitsConfig(model_args=args, use_phonemes=False, text_cleaner="english_cleaners")
    config.audio.sample_rate = TINY_VITS_SAMPLE_RATE
    config.audio.hop_length = TINY_VITS_HOP_LENGTH
    config.audio.do_trim_silence = False  # every frame's samples come out: durations are exact
    model = Vits(config)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_json(str(folder / "config.json"))
    torch.save({"model": model.state_dict()}, folder / "model.pth")
    return folder
