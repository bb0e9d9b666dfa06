"""TINY Coqui models with RANDOM weights, built with Coqui's own classes, for tests and plumbing benchmarks.

No Coqui voice can be fetched here, so the tests and ``scripts/bench_tts_engines.py`` build a
model of the real architecture, far smaller and untrained, save it to a folder in the layout
of a real download (``config.json`` + ``model.pth``; XTTS also ``vocab.json`` and
``speakers_xtts.pth``) and load it back through sub300's Coqui engine by path.  Its audio is noise: assert shapes, rates, durations, streaming order and
cancellation, never words; time it only as the engine's plumbing cost, never as a voice.
"""
from __future__ import annotations

import string
from pathlib import Path

#: the tiny VITS's output rate (Hz) and its decoder's samples per frame
TINY_VITS_SAMPLE_RATE = 16_000
TINY_VITS_HOP_LENGTH = 256


def build_tiny_vits(folder: Path, *, seed: int = 0, speakers: list[str] | None = None) -> Path:
    """Write a random-weight VITS (about 260 k parameters, 1 MB) into ``folder``; returns ``folder``.

    Deterministic: the same ``seed`` gives the same weights, and with ``inference_noise_scale``
    0 and the deterministic duration predictor (``use_sdp`` False) the same text gives the
    same audio, ``TINY_VITS_HOP_LENGTH`` samples per predicted frame at ``TINY_VITS_SAMPLE_RATE``.
    Characters only (no phonemizer), English cleaners.  With ``speakers``, a multi-speaker
    VITS whose ``speakers.pth`` (name -> id, as Coqui writes it) lies in ``folder``.
    Needs the ``sub300[coqui]`` extra."""
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
    folder.mkdir(parents=True, exist_ok=True)
    if speakers:
        torch.save({name: n for n, name in enumerate(speakers)}, folder / "speakers.pth")
        args.use_speaker_embedding = config.use_speaker_embedding = True
        args.speaker_embedding_channels = 8
        args.speakers_file = config.speakers_file = str(folder / "speakers.pth")
    config.audio.sample_rate = TINY_VITS_SAMPLE_RATE
    config.audio.hop_length = TINY_VITS_HOP_LENGTH
    config.audio.do_trim_silence = False  # every frame's samples come out: durations are exact
    model = Vits(config)
    config.save_json(str(folder / "config.json"))
    torch.save({"model": model.state_dict()}, folder / "model.pth")
    return folder


#: the tiny XTTS's output rate (Hz): XTTS v2's HiFi-GAN decoder's
TINY_XTTS_SAMPLE_RATE = 24_000
#: the speaker in the tiny XTTS's speaker file
TINY_XTTS_SPEAKER = "Tiny Speaker"
#: languages of XTTS v2 (its config's ``languages``; the tokenizer's tags are ``[<lang>]``)
_XTTS_LANGUAGES = ["en", "es", "fr", "de", "it", "pt", "pl", "tr", "ru", "nl", "cs", "ar", "zh-cn", "hu", "ko", "ja",
                   "hi"]


def _write_xtts_vocab(path: Path) -> None:
    """A character-level BPE tokenizer in the style of XTTS's vocab.json (special tokens first, as XTTS's)."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import Whitespace

    specials = ["[STOP]", "[UNK]", "[SPACE]"]   # ids 0, 1, 2 as in the real XTTS v2 vocab
    tags = ["[START]"] + [f"[{language}]" for language in _XTTS_LANGUAGES]
    vocab: dict[str, int] = {}
    for token in specials + list(string.ascii_lowercase + string.digits + ".,!?;:'\"-()&%$@/+*=_<>#") + tags:
        vocab.setdefault(token, len(vocab))
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials + tags])
    tokenizer.save(str(path))


def build_tiny_xtts(folder: Path, *, seed: int = 0, gpt_max_audio_tokens: int = 40) -> Path:
    """Write a random-weight XTTS v2 into ``folder`` (about 24 M parameters, 96 MB); returns ``folder``.

    The GPT is tiny (1 layer, width 64); the HiFi-GAN decoder (14 M) and the speaker encoder (8 M)
    keep Coqui's fixed sizes.  A random GPT practically never emits its stop token, so every
    sentence is ``gpt_max_audio_tokens - 3`` audio tokens (37: 41 216 samples, 1.72 s at 24 kHz)
    whatever its text.  The speaker file holds `TINY_XTTS_SPEAKER`, whose latents the model
    computes from a 3 s 200 Hz tone.  Needs the ``sub300[coqui]`` extra."""
    import torch
    from TTS.tts.configs.xtts_config import XttsConfig
    from TTS.tts.layers.xtts.tokenizer import VoiceBpeTokenizer
    from TTS.tts.models.xtts import Xtts

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    _write_xtts_vocab(folder / "vocab.json")
    tokenizer = VoiceBpeTokenizer(vocab_file=str(folder / "vocab.json"))
    config = XttsConfig()
    config.languages = list(_XTTS_LANGUAGES)
    args = config.model_args
    args.gpt_layers, args.gpt_n_model_channels, args.gpt_n_heads = 1, 64, 4
    args.decoder_input_dim = 64                      # the decoder reads the GPT's latents
    args.gpt_max_audio_tokens = gpt_max_audio_tokens
    args.gpt_max_text_tokens, args.gpt_max_prompt_tokens = 402, 70   # as XTTS v2
    args.gpt_use_perceiver_resampler = args.gpt_use_masking_gt_prompt_approach = True
    args.gpt_number_text_tokens = tokenizer.get_number_tokens()     # Xtts builds no GPT without it
    args.gpt_start_text_token = tokenizer.tokenizer.token_to_id("[START]")
    args.gpt_stop_text_token = tokenizer.tokenizer.token_to_id("[STOP]")
    args.tokenizer_file = ""                         # load_checkpoint finds vocab.json beside model.pth
    model = Xtts(config)
    model.tokenizer = tokenizer
    # saved before eval(), which adds gpt_inference.* entries that real checkpoints lack
    torch.save({"model": {k: v.detach().clone() for k, v in model.state_dict().items()}}, folder / "model.pth")
    config.save_json(str(folder / "config.json"))
    model.eval()
    rate = 22_050
    tone = (0.5 * torch.sin(2 * torch.pi * 200.0 * torch.arange(3 * rate) / rate)).unsqueeze(0)
    with torch.inference_mode():   # the entry's order matters: Xtts.synthesize reads .values()
        voice = {"gpt_cond_latent": model.get_gpt_cond_latents(tone, rate).clone(),
                 "speaker_embedding": model.get_speaker_embedding(tone, rate).clone()}
    torch.save({TINY_XTTS_SPEAKER: voice}, folder / "speakers_xtts.pth")
    return folder
