"""Whisper speech recognition on CTranslate2 (through faster-whisper).

One `WhisperRecognizer` per process, shared by every session; `transcribe`
blocks and is meant to run in a worker thread (CTranslate2 releases the GIL,
and concurrent calls are safe: the model queues them to its workers).

Two ways to feed the model:

* ``padding="full"`` — faster-whisper's own `transcribe`: every input is
  padded to 30 s of mel frames, as Whisper was trained.  The encoder then
  costs the same for a 1 s question as for a 30 s one (≈0.45 s for tiny.en
  int8 on 2 CPU threads).
* ``padding="short"`` — the utterance's own mel frames plus about one second
  of silence go straight to `ctranslate2.models.Whisper.generate`, which
  accepts inputs shorter than 3000 frames.  The encoder cost then scales with
  the clip.  Whisper never saw such inputs in training, so the decode is
  guarded: a token budget proportional to the duration, and a fallback to the
  full path when the output looks like a loop (hit the budget, or compresses
  too well), stopped early (too few words for the duration), or is a
  confident word where the model says "no speech" (a hallucinated "you" on
  near-silence); a repeated tail is trimmed to its first copy.  Clips longer
  than 30 s always take the full path.
* ``padding="window"`` — like "short", but the mel is padded with silence to
  at least ``window_s`` seconds (default 12 s): max(clip + 1 s, window_s).
  The encoder still costs a fraction of the 30 s window (its cost grows
  faster than linearly with the frame count), and the decoder sees an input
  closer to what Whisper was trained on.  Same decode path and guards as
  "short"; a guard that trips redoes the clip with full padding, and that
  time is part of the call.  (faster-whisper's ``chunk_length`` cannot do
  this: `transcribe` pads every segment to 3000 frames with `pad_or_trim`
  whatever the chunk length.)

The default is "window" with a 12 s window.  On the Asterisk set
(scripts/bench_asr.py --compare full,window:8,window:10,window:12,window:15,short,
tiny.en int8, 2 CPU threads, modes interleaved clip by clip, 2026-11-26):

  full       WER 4.92 %  p50 519 ms  p95 1606 ms  RTF 0.254
  window:12  WER 5.14 %  p50 156 ms  p95  451 ms  RTF 0.081
  window:10  WER 5.56 %  p50 141 ms  p95  418 ms  RTF 0.073
  short      WER 6.84 %  p50 105 ms  p95  378 ms  RTF 0.058

window:12 is the fastest setting within 0.5 WER points of "full"; "full"
remains the most accurate.  Padding with real silence (zero samples before the
STFT) scored better than padding the mel with zeros as faster-whisper's
`pad_or_trim` does (window:10: 2.71 % vs 3.10 % on the first 150 clips).

Model references: a local CTranslate2 directory, ``bundled:whisper-tiny.en``,
or a hub name (``tiny.en``, ``distil-large-v3``, ``Systran/faster-whisper-…``)
that must already be in the local Hugging Face cache unless
``allow_download=True``.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import zlib
from pathlib import Path

import numpy as np

from . import defaults
from .bundled import is_bundled, resolve_bundled
from .device import select_placement
from .protocols import SAMPLE_RATE, ModelError, ModelUnavailable, Transcript

log = logging.getLogger(__name__)

PADDINGS = defaults.WHISPER_PADDINGS

#: shorter clips are not worth a model call: nothing intelligible fits in them
MIN_AUDIO_SECONDS = 0.1
#: peak amplitude below which a clip is treated as silence without running the model
SILENCE_PEAK = 1e-3
#: seconds of silence appended to the utterance in "short" mode
SHORT_PAD_SECONDS = 1.0
#: default minimum input length in "window" mode
WINDOW_SECONDS = defaults.WHISPER_WINDOW_S
#: Whisper's input window: longer clips always take faster-whisper's own path
MAX_WINDOW_SECONDS = defaults.WHISPER_MAX_WINDOW_S
#: Whisper's own thresholds for "this window holds no speech"
NO_SPEECH_THRESHOLD = 0.6
LOG_PROB_THRESHOLD = -1.0
#: gzip compression ratio above which a decode is taken for a repetition loop
COMPRESSION_RATIO_THRESHOLD = 2.4
#: token budget in short mode: tokens per second of audio, plus a floor
TOKENS_PER_SECOND = 8.0
MIN_NEW_TOKENS = 16
MAX_LENGTH = 448  # Whisper's decoder context


#: a short-padding decode with fewer words per second than this (on a clip longer
#: than SPARSE_MIN_SECONDS) probably stopped early and is redone padded
SPARSE_WORDS_PER_SECOND = 1.0
SPARSE_MIN_SECONDS = 3.0
#: above this many words per second a twice-repeated phrase is a decoding loop, not speech
LOOP_WORDS_PER_SECOND = 3.0


def trim_repetition(text: str, seconds: float) -> str:
    """Cut a decoding loop ("Thank you. Thank you. Thank you.") down to its first copy.

    Whisper fed a short window sometimes repeats the end of the utterance until
    its token budget runs out.  A tail that repeats the phrase before it — at
    least three times, or at an implausible speaking rate — is cut after the
    first copy; the last copy may be partial and its last word truncated.
    "bye bye" at a normal rate is left alone.
    """
    words = text.split()
    keys = ["".join(ch for ch in w.lower() if ch.isalnum()) for w in words]
    n = len(keys)
    if n < 2 or n > 300:
        return text
    fast = n / max(seconds, 1e-3) > LOOP_WORDS_PER_SECOND
    for start in range(n - 1):
        for period in range(1, n - start):
            repeated = n - start - period  # words after the first copy
            if repeated < min(period, max(2, (period + 1) // 2)):
                break
            if not (fast or repeated >= 2 * period):
                continue
            last, model = keys[n - 1], keys[n - 1 - period]
            if not (last == model or (last and model.startswith(last))):
                continue
            if all(keys[i] == keys[i - period] for i in range(start + period, n - 1)):
                return " ".join(words[: start + period])
    return text


def _compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / max(1, len(zlib.compress(data)))


class WhisperRecognizer:
    """`models.protocols.SpeechRecognizer` backed by faster-whisper / CTranslate2."""

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        compute_type: str = "auto",
        cpu_threads: int = defaults.CT2_THREADS,
        beam_size: int = defaults.WHISPER_BEAM_SIZE,
        language: str | None = defaults.WHISPER_LANGUAGE,
        padding: str = defaults.WHISPER_PADDING,
        window_s: float = WINDOW_SECONDS,
        allow_download: bool = False,
    ) -> None:
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, not {padding!r}")
        if not 0.0 < window_s <= MAX_WINDOW_SECONDS:
            raise ValueError(f"window_s must be in (0, {MAX_WINDOW_SECONDS:g}], not {window_s!r}")
        if beam_size < 1:
            raise ValueError("beam_size must be >= 1")
        self.padding = padding
        self.window_s = float(window_s)
        self.beam_size = beam_size
        self.placement = select_placement("stt", device, compute_type, cpu_default="int8", cuda_default="float16")
        self.device = str(self.placement)
        model_path = self._locate(model, allow_download)
        self.name = f"whisper:{model}"

        from faster_whisper import WhisperModel  # heavy import: only when an engine is built

        try:
            self._fw = WhisperModel(
                str(model_path),
                device=self.placement.device,
                compute_type=self.placement.compute_type,
                cpu_threads=cpu_threads,
                local_files_only=True,
            )
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelUnavailable(f"cannot load Whisper model {model!r} from {model_path}: {exc}") from exc

        self._ct2 = self._fw.model
        self.multilingual = bool(self._ct2.is_multilingual)
        if not self.multilingual and language not in (None, "en"):
            log.warning("%s is English-only; ignoring language=%r", model, language)
            language = "en"
        self.language = language if self.multilingual else "en"
        self._tokenizers: dict[str, object] = {}
        self._tok_lock = threading.Lock()
        #: how many short/window decodes tripped a guard and were redone with full padding
        self.fallbacks = 0
        log.info(
            "stt: %s on %s, padding=%s%s, beam=%d",
            self.name, self.device, padding, f" ({self.window_s:g} s)" if padding == "window" else "", beam_size,
        )

    # ------------------------------------------------------------ loading
    @staticmethod
    def _locate(model: str, allow_download: bool) -> Path:
        if is_bundled(model):
            return resolve_bundled(model)
        expanded = os.path.expanduser(model)
        if os.path.isdir(expanded):
            if not os.path.isfile(os.path.join(expanded, "model.bin")):
                raise ModelUnavailable(f"{expanded} is not a CTranslate2 Whisper model (no model.bin)")
            return Path(expanded)
        if model.startswith(("/", ".", "~")) or os.path.exists(expanded):
            raise ModelUnavailable(f"Whisper model directory {expanded} does not exist")
        # a hub name: only the local cache unless downloads are allowed
        from faster_whisper.utils import download_model

        try:
            return Path(download_model(model, local_files_only=not allow_download))
        except ValueError as exc:  # not a known size and not an owner/name id
            raise ModelUnavailable(f"unknown Whisper model {model!r}: {exc}") from exc
        except Exception as exc:  # huggingface_hub: LocalEntryNotFoundError, HTTP errors, validation
            if allow_download:
                raise ModelUnavailable(f"could not download Whisper model {model!r}: {exc}") from exc
            raise ModelUnavailable(
                f"Whisper model {model!r} is not in the local Hugging Face cache and downloads are off "
                f"(allow_download=False); use a local CTranslate2 directory or bundled:whisper-tiny.en"
            ) from exc

    def _tokenizer(self, language: str):
        with self._tok_lock:
            tok = self._tokenizers.get(language)
            if tok is None:
                from faster_whisper.tokenizer import Tokenizer

                tok = Tokenizer(self._fw.hf_tokenizer, self.multilingual, task="transcribe", language=language)
                self._tokenizers[language] = tok
            return tok

    # ------------------------------------------------------------ inference
    def transcribe(self, audio: np.ndarray) -> Transcript:
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        seconds = len(audio) / SAMPLE_RATE
        start = time.perf_counter()
        if seconds < MIN_AUDIO_SECONDS or not np.isfinite(audio).all() or float(np.abs(audio).max()) < SILENCE_PEAK:
            return Transcript("", seconds, time.perf_counter() - start)
        try:
            if self.padding != "full" and seconds <= MAX_WINDOW_SECONDS:
                min_seconds = self.window_s if self.padding == "window" else 0.0
                decoded: tuple[str, float | None, float | None] | None = self._transcribe_short(audio, min_seconds)
                if decoded is None:  # the guard tripped: take Whisper's trained path
                    self.fallbacks += 1
                    decoded = self._transcribe_full(audio)
            else:
                decoded = self._transcribe_full(audio)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"Whisper inference failed: {exc}") from exc
        assert decoded is not None
        text, no_speech_prob, avg_logprob = decoded
        return Transcript(text, seconds, time.perf_counter() - start, no_speech_prob, avg_logprob)

    def _transcribe_full(self, audio: np.ndarray) -> tuple[str, float | None, float | None]:
        """(text, the first segment's no_speech_prob, mean avg_logprob of the segments)."""
        segments, _info = self._fw.transcribe(
            audio,
            language=self.language,
            beam_size=self.beam_size,
            temperature=0.0,
            vad_filter=False,
            without_timestamps=True,
            condition_on_previous_text=False,
        )
        kept = [s for s in segments if s.text.strip()]
        text = " ".join(s.text.strip() for s in kept).strip()
        if not kept:
            return text, None, None
        return text, kept[0].no_speech_prob, float(np.mean([s.avg_logprob for s in kept]))

    def _features(self, audio: np.ndarray, min_seconds: float = 0.0) -> np.ndarray:
        """Log-mel of the utterance plus trailing silence: ~1 s, or up to `min_seconds` in all.

        Never more than Whisper's 3000 frames (30 s).
        """
        fe = self._fw.feature_extractor
        total = max(len(audio) + int(SHORT_PAD_SECONDS * SAMPLE_RATE), int(min_seconds * SAMPLE_RATE))
        total = min(total, max(len(audio), int(MAX_WINDOW_SECONDS * SAMPLE_RATE)))
        # padding= appends zero samples before the STFT, like Whisper's own log_mel_spectrogram
        feats = fe(audio, padding=total - len(audio))[:, :-1]
        feats = feats[:, : fe.nb_max_frames]
        if feats.shape[1] % 2:  # the encoder's stride-2 convolution wants an even count
            feats = feats[:, :-1]
        return np.ascontiguousarray(feats[None].astype(np.float32))

    def _transcribe_short(self, audio: np.ndarray, min_seconds: float = 0.0) -> tuple[str, float, float] | None:
        """Decode a clip of at most 30 s fed without 30 s padding: (text, no_speech_prob, avg_logprob);
        None when a guard trips."""
        import ctranslate2
        from faster_whisper.transcribe import get_suppressed_tokens

        seconds = len(audio) / SAMPLE_RATE
        features = ctranslate2.StorageView.from_array(self._features(audio, min_seconds))
        language = self.language
        if language is None:  # multilingual model, detect from this clip
            ranked = self._ct2.detect_language(features)[0]
            language = ranked[0][0].strip("<|>")
        tok = self._tokenizer(language)
        prompt = list(tok.sot_sequence) + [tok.no_timestamps]
        budget = min(MAX_LENGTH - len(prompt), int(MIN_NEW_TOKENS + TOKENS_PER_SECOND * seconds))
        result = self._ct2.generate(
            features,
            [prompt],
            beam_size=self.beam_size,
            max_length=len(prompt) + budget,
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=list(get_suppressed_tokens(tok, [-1])),
        )[0]
        tokens = [t for t in result.sequences_ids[0] if t < tok.eot]
        text = tok.decode(tokens).strip()
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1) if tokens else 0.0
        if result.no_speech_prob > NO_SPEECH_THRESHOLD:
            if avg_logprob < LOG_PROB_THRESHOLD:
                return "", result.no_speech_prob, avg_logprob
            # "probably no speech" yet a confident word — often a hallucinated "you" on
            # near-silence in a padded window: let the trained 30 s path decide
            log.info("stt: no_speech_prob %.2f with text %r; retrying padded", result.no_speech_prob, text)
            return None
        trimmed = trim_repetition(text, seconds)
        if trimmed != text:
            log.debug("stt: trimmed a decoding loop: %r -> %r", text, trimmed)
            return trimmed, result.no_speech_prob, avg_logprob
        if seconds > SPARSE_MIN_SECONDS and len(text.split()) < SPARSE_WORDS_PER_SECOND * seconds:
            # stopped early: a short window sometimes ends the decode after the first sentence
            log.info("stt: short decode gave %d words for %.1f s; retrying padded", len(text.split()), seconds)
            return None
        if len(tokens) >= budget or _compression_ratio(text) > COMPRESSION_RATIO_THRESHOLD:
            log.info("stt: short decode looks like a loop (%d tokens for %.1f s); retrying padded", len(tokens), seconds)
            return None
        return text, result.no_speech_prob, avg_logprob
