#!/usr/bin/env python3
"""Speech-recognition benchmark on real recorded speech: WER, real-time factor, latency.

Data: Debian's Asterisk core sounds (one speaker, 563 spoken prompts, ≈25 min,
CC-BY-SA): the 16 kHz G.722 recordings from `asterisk-core-sounds-en-g722`
and their transcripts from `asterisk-core-sounds-en`.  Both packages are
fetched with `apt-get download` into a cache directory and unpacked there
with `dpkg-deb -x`; nothing is installed system-wide.

    python scripts/bench_asr.py --compare                # short vs full padding, all clips
    python scripts/bench_asr.py --compare full,window:8,window:10,window:15,short
    python scripts/bench_asr.py --padding window --window-s 10 --limit 50
    python scripts/bench_asr.py --model /models/distil-large-v3 --device cuda --compare

A mode is "full", "short", "window" (with --window-s) or "window:W".

WER: `sub300.testing.wer` (whisper-normalizer's EnglishTextNormalizer on both
sides, jiwer for the edit count; needs the `test` extra).  Latency is the
wall time of one `transcribe` call per clip (a guard's redo with full padding
included).  With several modes the runs are interleaved clip by clip — every
mode on clip 1, then on clip 2, … with the order rotated from clip to clip —
so that background load on a shared machine falls on all of them alike.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sub300.models.protocols import SAMPLE_RATE
from sub300.testing.wer import normalize, word_errors

PACKAGES = ("asterisk-core-sounds-en-g722", "asterisk-core-sounds-en")
TRANSCRIPTS = "usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz"
SOUNDS = "usr/share/asterisk/sounds/en_US_f_Allison"
DEFAULT_DATA_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sub300" / "asterisk"


# ------------------------------------------------------------------ data
def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def ensure_data(data_dir: Path) -> Path:
    """Download and unpack the two Debian packages once; returns the unpack root."""
    root = data_dir / "root"
    if (root / TRANSCRIPTS).exists() and (root / SOUNDS).is_dir():
        return root
    debs = data_dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    for pkg in PACKAGES:
        if any(debs.glob(f"{pkg}_*.deb")):
            continue
        print(f"apt-get download {pkg} …", file=sys.stderr)
        res = _run(["apt-get", "download", pkg], debs)
        if res.returncode != 0 or not any(debs.glob(f"{pkg}_*.deb")):
            print("  no package lists? running apt-get update", file=sys.stderr)
            _run(["apt-get", "update"], debs)
            res = _run(["apt-get", "download", pkg], debs)
            if res.returncode != 0:
                sys.exit(f"apt-get download {pkg} failed:\n{res.stderr}")
    root.mkdir(parents=True, exist_ok=True)
    for deb in sorted(debs.glob("*.deb")):
        if any(deb.name.startswith(f"{p}_") for p in PACKAGES):
            res = _run(["dpkg-deb", "-x", str(deb), str(root)], data_dir)
            if res.returncode != 0:
                sys.exit(f"dpkg-deb -x {deb} failed:\n{res.stderr}")
    return root


def read_transcripts(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(";") or ":" not in line:
                continue
            name, text = line.split(":", 1)
            out[name.strip()] = text.strip()
    return out


def decode_g722(path: Path) -> np.ndarray:
    """Raw G.722 → float32 mono 16 kHz with PyAV."""
    import av

    chunks: list[np.ndarray] = []
    with av.open(str(path), format="g722") as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        for frame in container.decode(audio=0):
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
        chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


@dataclass
class Clip:
    name: str
    reference: str
    audio: np.ndarray

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def load_clips(root: Path, limit: int | None) -> list[Clip]:
    transcripts = read_transcripts(root / TRANSCRIPTS)
    clips = []
    for name in sorted(transcripts):
        path = root / SOUNDS / f"{name}.g722"
        ref = transcripts[name]
        if not path.exists() or not normalize(ref):  # "[this is a simple beep tone]"
            continue
        clips.append(Clip(name, ref, decode_g722(path)))
        if limit and len(clips) >= limit:
            break
    return clips


# ------------------------------------------------------------------ run
@dataclass
class Result:
    padding: str
    device: str
    wer: float
    errors: int
    words: int
    audio_s: float
    infer_s: float
    p50_ms: float
    p95_ms: float
    fallbacks: int
    failures: list[dict]
    hypotheses: dict[str, str]


def parse_mode(spec: str, window_s: float) -> tuple[str, float]:
    """"full" | "short" | "window" | "window:W" → (padding, window seconds)."""
    name, _, w = spec.strip().partition(":")
    if name not in ("full", "short", "window") or (w and name != "window"):
        raise argparse.ArgumentTypeError(f"bad mode {spec!r}: use full, short, window or window:SECONDS")
    try:
        return name, float(w) if w else window_s
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad window length in {spec!r}") from None


def mode_label(padding: str, window_s: float) -> str:
    return f"window:{window_s:g}" if padding == "window" else padding


class _Run:
    """One mode's recognizer and its running tallies."""

    def __init__(self, args: argparse.Namespace, padding: str, window_s: float) -> None:
        from sub300.models.stt_whisper import WhisperRecognizer

        self.label = mode_label(padding, window_s)
        self.rec = WhisperRecognizer(
            args.model,
            device=args.device,
            compute_type=args.compute_type,
            cpu_threads=args.cpu_threads,
            beam_size=args.beam_size,
            padding=padding,
            window_s=window_s,
        )
        self.errors = self.words = 0
        self.lat: list[float] = []
        self.failures: list[dict] = []
        self.hypotheses: dict[str, str] = {}

    def step(self, clip: Clip) -> None:
        t0 = time.perf_counter()
        tr = self.rec.transcribe(clip.audio)
        self.lat.append(time.perf_counter() - t0)
        self.hypotheses[clip.name] = tr.text
        e, n = word_errors(clip.reference, tr.text)
        self.errors += e
        self.words += n
        if e:
            self.failures.append({"name": clip.name, "errors": e, "ref": clip.reference, "hyp": tr.text})

    def result(self, clips: list[Clip]) -> Result:
        ms = np.array(self.lat) * 1000
        return Result(
            padding=self.label,
            device=self.rec.device,
            wer=self.errors / max(1, self.words),
            errors=self.errors,
            words=self.words,
            audio_s=sum(c.seconds for c in clips),
            infer_s=float(sum(self.lat)),
            p50_ms=float(np.percentile(ms, 50)),
            p95_ms=float(np.percentile(ms, 95)),
            fallbacks=self.rec.fallbacks,
            failures=self.failures,
            hypotheses=self.hypotheses,
        )


def run_modes(args: argparse.Namespace, modes: list[tuple[str, float]], clips: list[Clip]) -> list[Result]:
    """Every mode on clip 1, then every mode on clip 2, …, the order rotated by one each clip."""
    runs = [_Run(args, padding, w) for padding, w in modes]
    for run in runs:
        run.rec.transcribe(clips[0].audio)  # warm-up, not counted
        run.rec.fallbacks = 0
    for i, clip in enumerate(clips):
        k = i % len(runs)
        for run in runs[k:] + runs[:k]:
            run.step(clip)
        if args.progress and (i + 1) % 50 == 0:
            so_far = ", ".join(f"{r.label} {100 * r.errors / max(1, r.words):.2f}%" for r in runs)
            print(f"  {i + 1}/{len(clips)} WER so far: {so_far}", file=sys.stderr)
    return [run.result(clips) for run in runs]


def run_one(args: argparse.Namespace, padding: str, clips: list[Clip], window_s: float = 12.0) -> Result:
    return run_modes(args, [(padding, window_s)], clips)[0]


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def table(args: argparse.Namespace, clips: list[Clip], results: list[Result]) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    audio = sum(c.seconds for c in clips)
    lines = [
        f"ASR on Asterisk core sounds ({len(clips)} clips, {audio / 60:.1f} min, "
        f"{min(c.seconds for c in clips):.1f}–{max(c.seconds for c in clips):.1f} s each), "
        f"model `{args.model}`, beam {args.beam_size}, cpu_threads {args.cpu_threads} — {now}, {machine()}"
        + (", modes interleaved clip by clip" if len(results) > 1 else ""),
        "",
        "| padding | device | WER | errors / words | RTF | p50 latency | p95 latency | fallbacks to full |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.padding} | {r.device} | {100 * r.wer:.2f} % | {r.errors} / {r.words} | "
            f"{r.infer_s / r.audio_s:.3f} | {r.p50_ms:.0f} ms | {r.p95_ms:.0f} ms | "
            f"{'–' if r.padding == 'full' else r.fallbacks} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:whisper-tiny.en")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compute-type", default="auto")
    ap.add_argument("--cpu-threads", type=int, default=0)
    ap.add_argument("--beam-size", type=int, default=1)
    ap.add_argument("--padding", choices=("short", "window", "full"), default="window")
    ap.add_argument("--window-s", type=float, default=12.0, help="minimum input seconds for --padding window")
    ap.add_argument(
        "--compare",
        nargs="?",
        const="short,full",
        metavar="MODES",
        help="run several modes interleaved clip by clip, e.g. full,window:8,window:10,short "
        "(bare --compare: short,full)",
    )
    ap.add_argument("--limit", type=int, default=0, help="first N clips only (0 = all)")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    ap.add_argument("--json", type=Path, help="also write results (every transcript, every mistranscribed clip) here")
    ap.add_argument("--show-errors", type=int, default=0, help="print up to N mistranscribed clips per run")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)

    root = ensure_data(args.data_dir.expanduser())
    clips = load_clips(root, args.limit or None)
    if not clips:
        sys.exit("no clips found")
    try:
        specs = args.compare.split(",") if args.compare else [args.padding]
        modes = [parse_mode(m, args.window_s) for m in specs if m.strip()]
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    results = run_modes(args, modes, clips)
    print(table(args, clips, results))
    for r in results:
        for f in r.failures[: args.show_errors]:
            print(f"\n[{r.padding}] {f['name']} ({f['errors']} errors)\n  ref: {f['ref']}\n  hyp: {f['hyp']}")
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine(), "model": args.model, "results": [r.__dict__ for r in results]}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
