"""Engine defaults and limits, in one place.

The engines' constructors take their keyword defaults from here, and
`agent/config.py` declares its fields with the same names, so a default
cannot drift between "the engine built by hand" (tests, scripts) and "the
engine built from the configuration".  Nothing but constants: the
configuration loads this module without loading any engine.
"""
from __future__ import annotations

from typing import Final

# webrtcvad (models/vad_webrtc.py)
WEBRTC_AGGRESSIVENESS = 3          # 0 (least) .. 3 (most aggressive at calling audio unvoiced)
WEBRTC_AGGRESSIVENESS_MAX = 3
WEBRTC_FRAME_MS: Final = 20           # webrtcvad accepts 10, 20 or 30 ms frames at 16 kHz
WEBRTC_FRAME_MS_CHOICES = (10, 20, 30)

# Silero VAD (models/vad_silero.py): speech probability above which a frame is voiced, in (0, 1)
SILERO_THRESHOLD = 0.5

# Whisper (models/stt_whisper.py)
WHISPER_BEAM_SIZE = 1
WHISPER_LANGUAGE = "en"
WHISPER_PADDINGS = ("short", "window", "full")
WHISPER_PADDING: Final = "window"
WHISPER_WINDOW_S = 12.0            # window padding: pad the mel to max(clip + 1 s, this)
WHISPER_MAX_WINDOW_S = 30.0        # Whisper's own input window

# CTranslate2 engines: 0 = one thread per core
CT2_THREADS = 0

# OpenAI-compatible LLM endpoint (models/llm_openai.py)
OPENAI_CONNECT_TIMEOUT_S = 3.0
OPENAI_FIRST_TOKEN_TIMEOUT_S = 10.0

# Piper (models/tts_piper.py)
PIPER_VOICE = "bundled:piper-joe"
PIPER_THREADS = 2                  # ONNX threads per synthesis

# Coqui TTS (models/tts_coqui.py)
COQUI_STREAM_CHUNK_SIZE = 20       # XTTS: GPT audio tokens per streamed chunk (Coqui's inference_stream default)

# espeak-ng (models/tts_espeak.py)
ESPEAK_VOICE = "en-us"
ESPEAK_SPEED_WPM = 175
ESPEAK_SPEED_WPM_MIN = 80          # espeak-ng's own -s range
ESPEAK_SPEED_WPM_MAX = 500
