"""Coqui TTS (package ``coqui-tts``, imported as ``TTS``): VITS-family voices and XTTS v2 on PyTorch.

``model`` is a local folder (``config.json`` beside the checkpoint: ``model.pth``,
``model_file.pth``, ``checkpoint.pth``, ``best_model.pth`` or a single ``*.pth``; an XTTS
folder also holds ``vocab.json`` and usually ``speakers_xtts.pth``) or a Coqui model name
(``tts_models/<language>/<dataset>/<model>``, e.g. ``tts_models/multilingual/multi-dataset/xtts_v2``).
A name is looked up where Coqui keeps its downloads (its Hugging Face cache for hub-hosted
models, else ``~/.local/share/tts``) and then loaded from that folder by the same code as a
path; it is downloaded only with ``allow_download=True`` (``models.allow_download``).

How the audio comes out:

* **XTTS** (a model with ``inference_stream``): the GPT's audio tokens are decoded every
  ``stream_chunk_size`` tokens, so chunks flow out while the GPT is still generating —
  Coqui's own streaming inference.  The voice is a speaker of the model's speaker file
  (``speaker``) or cloned from a recording (``speaker_wav``, any format PyAV decodes); its
  conditioning latents are computed once, at load.
* **every other model**: sentence by sentence (Coqui's pySBD segmenter for the model's
  language), each sentence's audio yielded as soon as it is ready.

Either way a chunk is yielded the moment it exists, so the ledger's TTS marks are when
the audio was made, and a consumer that stops reading (barge-in) stops the synthesis at
the next chunk: the generator is closed in its worker thread (models/threads.py).  Chunks
are int16 mono at ``sample_rate`` (the model's output rate: 24 kHz for XTTS v2, the
voice's own for VITS); the reply resamples them to the call's rate with PyAV
(agent/audio.py ``StreamResampler``), as for every engine.

Device: ``auto`` is CUDA when PyTorch sees a GPU, else the CPU (models/torch_device.py,
logged).  On the CPU ``threads`` sets PyTorch's intra-op threads, which is process-wide.
The weights stay float32: Coqui's XTTS and VITS are not validated in float16.
Syntheses may run concurrently from several worker threads (``tts.workers``): inference
is stateless under ``torch.inference_mode``.

coqui-tts is MPL-2.0; the XTTS v2 weights carry the Coqui Public Model License
(non-commercial).  It is the optional extra ``sub300[coqui]`` (torch and its libraries
are several GB).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np

from . import defaults
from .bundled import not_installed
from .protocols import ModelUnavailable
from .synthesis import float_to_int16, synthesis_errors
from .torch_device import select_torch_device

log = logging.getLogger(__name__)

#: checkpoint file names Coqui's own model manager looks for, in its order (TTS/utils/manage.py)
_CHECKPOINT_NAMES = ("model_file.pth", "model_file.pth.tar", "model.pth", "checkpoint.pth", "best_model.pth")
#: the rate XTTS computes its conditioning latents at (TTS/tts/models/xtts.py, ``load_sr``)
_XTTS_REFERENCE_RATE = 22_050


def _import_coqui() -> Any:
    # Coqui logs every sentence's text at INFO (TTS.utils.synthesizer), past sub300's own
    # redaction of logged transcripts; its warnings still show.
    coqui_log = logging.getLogger("TTS")
    if coqui_log.level == logging.NOTSET:
        coqui_log.setLevel(logging.WARNING)
    try:
        import TTS  # noqa: F401  (raises ImportError itself when torchaudio/torchcodec are missing)
        from TTS.utils import synthesizer
    except ImportError as exc:
        error = not_installed("TTS", 'the TTS engine "coqui" (tts.engine)')
        raise ModelUnavailable(f"{error}\n(import TTS failed: {exc})") from exc
    return synthesizer


# ------------------------------------------------------------------ locating the model
def locate_coqui_model(model: str | Path, *, allow_download: bool = False) -> Path:
    """The local folder holding ``model``'s ``config.json`` and checkpoint.

    ``model``: a folder, or a Coqui model name ``tts_models/<lang>/<dataset>/<model>``.
    Raises `ModelUnavailable` for a missing folder, an unknown name, or a name that is not
    downloaded while ``allow_download`` is False."""
    text = str(model)
    expanded = Path(os.path.expanduser(text))
    if expanded.is_dir():
        if not (expanded / "config.json").is_file():
            raise ModelUnavailable(f"{expanded} is not a Coqui model folder (no config.json)")
        return expanded
    parts = text.split("/")
    if text.startswith(("/", ".", "~")) or expanded.exists() or len(parts) != 4 or parts[0] != "tts_models":
        raise ModelUnavailable(
            f"Coqui model {text!r}: not a folder with config.json, nor a name tts_models/<lang>/<dataset>/<model>"
        )
    _import_coqui()
    from TTS.utils.manage import ModelManager

    manager = ModelManager(progress_bar=False)
    kind, language, dataset, name = parts
    try:
        item = manager.models_dict[kind][language][dataset][name]
    except KeyError:
        raise ModelUnavailable(f"unknown Coqui model {text!r} (see `tts --list_models`)") from None
    if allow_download:
        if not manager.tos_agreed(item, Path(manager.output_prefix) / "--".join(parts)):
            # Coqui would ask on stdin ([y/n]), which a server has not: a start that hangs, or fails on EOF
            raise ModelUnavailable(
                f"Coqui model {text!r} is under {item.get('license', 'a licence')} that must be accepted before "
                f"its download: read it, then set COQUI_TOS_AGREED=1 in sub300's environment")
        try:
            checkpoint, _config, _item = manager.download_model(text)
        except Exception as exc:  # network, hub and archive errors all end here
            raise ModelUnavailable(f"could not download Coqui model {text!r}: {exc}") from exc
        return Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    return _cached_folder(text, item, Path(manager.output_prefix) / "--".join(parts))


def _cached_folder(name: str, item: dict[str, Any], legacy_folder: Path) -> Path:
    """Where a previous download of ``name`` lies, without touching the network."""
    off = (f"Coqui model {name!r} is not downloaded and downloads are off: set tts.coqui_model to a local "
           f"model folder, or models.allow_download = true")
    if "repo_id" in item:  # hub-hosted (XTTS v2 and newer): the Hugging Face cache, as Coqui's manager uses it
        # a lookup in the cache folder, which never touches the network
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(item["repo_id"], "config.json")
        if not isinstance(cached, str):   # None, or the cache's "known not to exist"
            raise ModelUnavailable(off)
        folder = Path(cached).parent      # the snapshot: config.json beside the checkpoint
    else:  # older models: unpacked under Coqui's data folder as <kind>--<lang>--<dataset>--<model>
        folder = legacy_folder
    if not (folder / "config.json").is_file():
        raise ModelUnavailable(off)
    return folder


def _checkpoint_in(folder: Path, config: Any) -> Path:
    """XTTS loads from its folder; other models from one checkpoint file in it."""
    if config.get("model") == "xtts":
        return folder
    for filename in _CHECKPOINT_NAMES:
        if (folder / filename).is_file():
            return folder / filename
    candidates = sorted(folder.glob("*.pth"))
    if len(candidates) == 1:
        return candidates[0]
    raise ModelUnavailable(f"no checkpoint in {folder}: expected one of {', '.join(_CHECKPOINT_NAMES)} or a single .pth")


def decode_reference(path: str | Path, rate: int = _XTTS_REFERENCE_RATE) -> np.ndarray:
    """A voice recording as float32 mono at ``rate`` in [-1, 1] (any format PyAV decodes).

    Raises `ModelUnavailable` for a file that cannot be read or holds no audio."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    pieces: list[np.ndarray] = []
    try:
        with av.open(os.path.expanduser(str(path))) as container:
            for frame in container.decode(audio=0):
                pieces.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
            pieces.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    except (av.FFmpegError, OSError, IndexError) as exc:
        raise ModelUnavailable(f"cannot read the voice recording {path}: {exc}") from exc
    audio = np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)
    if audio.size < rate // 3:  # XTTS ignores references under 0.33 s
        raise ModelUnavailable(f"the voice recording {path} holds {audio.size / rate:.2f} s of audio; XTTS needs >= 0.33 s")
    return audio


def _listed(names: Any, shown: int = 8) -> str:
    names = list(names)
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


# ------------------------------------------------------------------ the engine
class CoquiSynthesizer:
    """`SpeechSynthesizer` over a Coqui TTS model (see the module docstring)."""

    name = "coqui"

    def __init__(
        self,
        model: str | Path,
        *,
        device: str = "auto",
        speaker: str | None = None,
        language: str | None = None,
        speaker_wav: str | Path | None = None,
        stream_chunk_size: int = defaults.COQUI_STREAM_CHUNK_SIZE,
        threads: int = defaults.PIPER_THREADS,
        allow_download: bool = False,
    ) -> None:
        """``speaker``: a speaker of a multi-speaker model (XTTS: a name in its speaker file);
        ``language``: for multilingual models (XTTS: ``en``, ``de``, ...; default ``en``);
        ``speaker_wav``: XTTS only, a recording to clone the voice from;
        ``stream_chunk_size``: XTTS only, GPT audio tokens per streamed chunk (Coqui's default 20).
        Raises `ModelUnavailable` (missing package, folder, checkpoint, speaker, recording or device)
        or `ValueError` (bad numbers, or both ``speaker`` and ``speaker_wav``)."""
        if stream_chunk_size < 1:
            raise ValueError(f"stream_chunk_size must be >= 1, got {stream_chunk_size!r}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads!r}")
        if speaker and speaker_wav:
            raise ValueError("a speaker of the model's or a recording to clone, not both")
        synthesizer_module = _import_coqui()
        import torch

        self.folder = locate_coqui_model(model, allow_download=allow_download)
        self.device = select_torch_device("tts coqui", device)
        if self.device == "cpu":
            torch.set_num_threads(threads)
        from TTS.config import load_config

        config_path = self.folder / "config.json"
        try:
            config = load_config(str(config_path))
            self._coqui = synthesizer_module.Synthesizer(
                tts_checkpoint=_checkpoint_in(self.folder, config), tts_config_path=config_path,
                use_cuda=self.device == "cuda",
            )
        except ModelUnavailable:
            raise
        except Exception as exc:  # a bad config or checkpoint: Coqui raises many kinds
            raise ModelUnavailable(f"cannot load the Coqui model in {self.folder}: {exc}") from exc
        self._model = self._coqui.tts_model
        self.model_type = str(config.get("model"))
        self.sample_rate: int = int(self._coqui.output_sample_rate)
        self.speaker = speaker
        self.stream_chunk_size = stream_chunk_size
        self.streaming = hasattr(self._model, "inference_stream")
        self._latents: tuple[Any, Any] | None = None
        self.language = self._language_of(language, default="en" if self.streaming else None)
        if self.streaming:
            self._latents = self._xtts_voice(speaker, speaker_wav)
        elif speaker_wav is not None:
            raise ModelUnavailable(f"tts coqui: a voice recording needs a model that clones voices (XTTS), "
                                   f"not {self.model_type}")
        else:
            self.speaker = self._speaker_of(speaker)
        log.info("tts coqui: %s from %s on %s, %d Hz, %s", self.model_type, self.folder, self.device, self.sample_rate,
                 f"streamed every {stream_chunk_size} tokens" if self.streaming else "sentence by sentence")

    def _language_of(self, language: str | None, *, default: str | None) -> str | None:
        """``language`` checked against the model's own list (XTTS: its config's; a multilingual VITS: its
        language manager's), or ``default``; a one-language model takes any (Coqui ignores it)."""
        manager = getattr(self._model, "language_manager", None)
        names = list(self._coqui.tts_config.get("languages") or []) if self.streaming else list(
            getattr(manager, "language_names", None) or [])
        language = language or default
        if language is None or len(names) < 2 or language in names or language.split("-")[0] in names:
            return language
        raise ModelUnavailable(f"tts coqui: language {language!r} is not one of {self.folder}'s: {_listed(names)}")

    def _speaker_of(self, speaker: str | None) -> str | None:
        """A multi-speaker model's speaker: ``speaker``, or its first one when none is asked for."""
        manager = getattr(self._model, "speaker_manager", None)
        names = list(getattr(manager, "speaker_names", None) or [])
        if not names:
            if speaker:
                raise ModelUnavailable(f"tts coqui: speaker {speaker!r} asked of {self.folder}, which has one voice")
            return None
        if speaker is None:
            log.info("tts coqui: no speaker set, using %r of %d", names[0], len(names))
            return names[0]
        if speaker not in names:
            raise ModelUnavailable(f"speaker {speaker!r} is not among {self.folder}'s: {_listed(names)}")
        return speaker

    def _xtts_voice(self, speaker: str | None, speaker_wav: str | Path | None) -> tuple[Any, Any]:
        """(gpt_cond_latent, speaker_embedding), computed once."""
        import torch

        if speaker_wav is not None:
            audio = torch.from_numpy(decode_reference(speaker_wav)).unsqueeze(0)
            with torch.inference_mode():
                return (self._model.get_gpt_cond_latents(audio, _XTTS_REFERENCE_RATE),
                        self._model.get_speaker_embedding(audio, _XTTS_REFERENCE_RATE))
        manager = getattr(self._model, "speaker_manager", None)
        speakers: dict[str, Any] = dict(getattr(manager, "speakers", None) or {})
        if not speakers:
            raise ModelUnavailable(f"the XTTS model in {self.folder} has no speaker file; set tts.coqui_speaker_wav")
        name = speaker or next(iter(speakers))
        if name not in speakers:
            raise ModelUnavailable(f"XTTS speaker {name!r} is not in {self.folder}'s speaker file: {_listed(speakers)}")
        self.speaker = name
        return speakers[name]["gpt_cond_latent"], speakers[name]["speaker_embedding"]

    # -------------------------------------------------------------- synthesis
    def synthesize(self, text: str) -> Iterator[np.ndarray]:
        """Yield int16 mono chunks at ``sample_rate``: XTTS's streamed chunks, else one per sentence.

        Raises `ModelError` when the model fails (the text's start is in the message)."""
        if not text or not text.strip():
            return
        chunks = self._stream(text) if self.streaming else self._sentences(text)
        try:
            with synthesis_errors("Coqui", text):
                for wave in chunks:
                    if wave.size:
                        yield float_to_int16(wave)
        finally:
            chunks.close()  # an XTTS stream holds the GPT's generator: end it in this thread

    def _stream(self, text: str) -> Generator[np.ndarray, None, None]:
        import torch

        assert self._latents is not None
        gpt_cond_latent, speaker_embedding = self._latents
        # Sentences split here, by the same pySBD segmenter as for VITS: XTTS's own splitting
        # (enable_text_splitting) needs spaCy, which coqui-tts does not install.
        for sentence in self._coqui.split_into_sentences(text, self.language):
            stream = self._model.inference_stream(
                sentence, self.language, gpt_cond_latent, speaker_embedding,
                stream_chunk_size=self.stream_chunk_size, enable_text_splitting=False,
            )
            try:
                while True:
                    with torch.inference_mode():  # per step: the mode is the thread's, and we yield between steps
                        chunk = next(stream, None)
                    if chunk is None:
                        break
                    yield chunk.detach().float().cpu().numpy().reshape(-1)
            finally:
                stream.close()

    def _sentences(self, text: str) -> Generator[np.ndarray, None, None]:
        import torch
        from TTS.utils.synthesizer import PAD_SILENCE_SAMPLES

        for sentence in self._coqui.split_into_sentences(text, self.language):
            with torch.inference_mode():
                wave = self._coqui.tts(sentence, speaker_name=self.speaker, language_name=self.language,
                                       split_sentences=False)
            # Synthesizer.tts appends PAD_SILENCE_SAMPLES of silence after every sentence; the reply
            # paces its own pauses, so only the sentence is yielded.
            yield np.asarray(wave[: len(wave) - PAD_SILENCE_SAMPLES], dtype=np.float32)

    def __repr__(self) -> str:
        return f"CoquiSynthesizer({str(self.folder)!r}, {self.model_type}, device={self.device!r})"
