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
from collections.abc import Sequence
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
        if self._nothing_to_hear(audio):
            return Transcript("", seconds, time.perf_counter() - start)
        try:
            if self._decodes_short(audio):
                decoded = self._decode_short_or_full(audio)
            else:
                decoded = self._transcribe_full(audio)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"Whisper inference failed: {exc}") from exc
        text, no_speech_prob, avg_logprob = decoded
        return Transcript(text, seconds, time.perf_counter() - start, no_speech_prob, avg_logprob)

    def transcribe_batch(self, audios: Sequence[np.ndarray]) -> list[Transcript]:
        """Blocking: several clips (float32 mono 16 kHz each) in one batched CTranslate2 call,
        one `Transcript` per clip, in order, as `transcribe` gives them clip by clip.

        Clips that `transcribe` would not decode short (silence or too short,
        ``padding="full"``, longer than 30 s) take the single path; the others
        share one ``Whisper.generate`` call (`_transcribe_short_batch`).
        ``inference_seconds`` of every transcript is the wall time of the whole
        call: no clip's text is ready before it returns.  Errors: `ModelError`
        for the whole batch.
        """
        start = time.perf_counter()
        clips = [np.asarray(audio, dtype=np.float32).reshape(-1) for audio in audios]
        decoded: list[tuple[str, float | None, float | None]] = [("", None, None)] * len(clips)
        try:
            short = [i for i, clip in enumerate(clips) if not self._nothing_to_hear(clip) and self._decodes_short(clip)]
            for i, clip in enumerate(clips):
                if i not in short and not self._nothing_to_hear(clip):
                    decoded[i] = self._transcribe_full(clip)
            if len(short) == 1:
                decoded[short[0]] = self._decode_short_or_full(clips[short[0]])
            elif short:
                batched, alone = self._transcribe_short_batch([clips[i] for i in short], self._min_seconds())
                for j, (i, result) in enumerate(zip(short, batched, strict=True)):
                    if j in alone:
                        decoded[i] = self._decode_short_or_full(clips[i])
                    elif result is None:      # a guard tripped, as in `transcribe`
                        self.fallbacks += 1
                        decoded[i] = self._transcribe_full(clips[i])
                    else:
                        decoded[i] = result
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"Whisper batched inference failed ({len(clips)} clips): {exc}") from exc
        elapsed = time.perf_counter() - start
        return [Transcript(text, len(clip) / SAMPLE_RATE, elapsed, no_speech_prob, avg_logprob)
                for clip, (text, no_speech_prob, avg_logprob) in zip(clips, decoded, strict=True)]

    @staticmethod
    def _nothing_to_hear(audio: np.ndarray) -> bool:
        """Too short, not finite, or below the silence peak: "" without running the model."""
        seconds = len(audio) / SAMPLE_RATE
        return seconds < MIN_AUDIO_SECONDS or not np.isfinite(audio).all() or float(np.abs(audio).max()) < SILENCE_PEAK

    def _decodes_short(self, audio: np.ndarray) -> bool:
        return self.padding != "full" and len(audio) / SAMPLE_RATE <= MAX_WINDOW_SECONDS

    def _min_seconds(self) -> float:
        return self.window_s if self.padding == "window" else 0.0

    def _decode_short_or_full(self, audio: np.ndarray) -> tuple[str, float | None, float | None]:
        """The short/window decode, or Whisper's trained 30 s path when a guard trips."""
        decoded: tuple[str, float | None, float | None] | None = self._transcribe_short(audio, self._min_seconds())
        if decoded is None:  # the guard tripped: take Whisper's trained path
            self.fallbacks += 1
            decoded = self._transcribe_full(audio)
        return decoded

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

    @staticmethod
    def _padded_samples(samples: int, min_seconds: float = 0.0) -> int:
        """The input length (samples) of a clip of ``samples`` in short/window mode: the clip plus
        ~1 s of silence, or `min_seconds` in all; never more than 30 s unless the clip is."""
        total = max(samples + int(SHORT_PAD_SECONDS * SAMPLE_RATE), int(min_seconds * SAMPLE_RATE))
        return min(total, max(samples, int(MAX_WINDOW_SECONDS * SAMPLE_RATE)))

    def _features(self, audio: np.ndarray, min_seconds: float = 0.0, total: int | None = None) -> np.ndarray:
        """Log-mel of the utterance plus trailing silence: ~1 s, or up to `min_seconds` in all
        (``total``: exactly this many samples in all, for a batch padded to its longest input).

        Never more than Whisper's 3000 frames (30 s).  Shape [1, n_mels, frames], frames even.
        """
        fe = self._fw.feature_extractor
        if total is None:
            total = self._padded_samples(len(audio), min_seconds)
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
        return self._judge_short(result, tok, seconds, budget)

    def _transcribe_short_batch(self, clips: list[np.ndarray], min_seconds: float
                                ) -> tuple[list[tuple[str, float, float] | None], set[int]]:
        """`_transcribe_short` for several clips (each at most 30 s) in one ``generate`` call.

        Returns one result per clip: (text, no_speech_prob, avg_logprob), or
        None when a guard trips (redo with full padding); and the positions of
        the clips that must be decoded on their own to keep the single path's
        result (their result is None).

        The batch needs one input length: every clip's mel is made from the
        clip plus silence (zero samples before the STFT, as in the single
        path) up to the longest input of the batch.  In window mode every clip
        up to ``window_s`` - 1 s has the same input alone or in the batch; a
        longer clip in the batch gives the others more trailing silence (a
        longer window).  The decode keeps each clip's own token budget:
        ``max_length`` is the largest budget, and a clip that used up its own
        budget (the single decode would have been cut there, and its text,
        score and guards depend on that cut) is redone alone; under greedy
        decoding (beam_size 1, the default) every other clip's tokens and
        scores are those of its single decode.  A multilingual model without a
        configured language detects each clip's language on the batch input
        and decodes one ``generate`` call per language.
        """
        import ctranslate2
        from faster_whisper.transcribe import get_suppressed_tokens

        total = max(self._padded_samples(len(clip), min_seconds) for clip in clips)
        feats = np.ascontiguousarray(np.concatenate([self._features(clip, total=total) for clip in clips]))
        features = ctranslate2.StorageView.from_array(feats)
        if self.language is None:
            languages = [ranked[0][0].strip("<|>") for ranked in self._ct2.detect_language(features)]
        else:
            languages = [self.language] * len(clips)
        out: list[tuple[str, float, float] | None] = [None] * len(clips)
        alone: set[int] = set()
        for language in dict.fromkeys(languages):
            rows = [i for i, lang in enumerate(languages) if lang == language]
            tok = self._tokenizer(language)
            prompt = list(tok.sot_sequence) + [tok.no_timestamps]
            seconds = [len(clips[i]) / SAMPLE_RATE for i in rows]
            budgets = [min(MAX_LENGTH - len(prompt), int(MIN_NEW_TOKENS + TOKENS_PER_SECOND * s)) for s in seconds]
            group = features if len(rows) == len(clips) else ctranslate2.StorageView.from_array(
                np.ascontiguousarray(feats[rows]))
            results = self._ct2.generate(
                group,
                [prompt] * len(rows),
                beam_size=self.beam_size,
                max_length=len(prompt) + max(budgets),
                return_scores=True,
                return_no_speech_prob=True,
                suppress_blank=True,
                suppress_tokens=list(get_suppressed_tokens(tok, [-1])),
            )
            for i, clip_seconds, budget, result in zip(rows, seconds, budgets, results, strict=True):
                used = sum(1 for t in result.sequences_ids[0] if t < tok.eot)
                if used >= budget and budget < max(budgets):
                    alone.add(i)
                else:
                    out[i] = self._judge_short(result, tok, clip_seconds, budget)
        return out, alone

    def _judge_short(self, result, tok, seconds: float, budget: int) -> tuple[str, float, float] | None:
        """The guards of a short/window decode (`_transcribe_short`): (text, no_speech_prob,
        avg_logprob), or None when the clip must be redone with full padding."""
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
