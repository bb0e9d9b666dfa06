"""Model engines shared by all sessions of a process.

Nothing here imports `agent`, `media` or `web`: engines see numpy arrays,
strings and paths, never a session or a transport.
"""

import os as _os

# CTranslate2 ships its own OpenMP runtime, which spin-waits between parallel
# regions by default.  With Whisper, the LLM and TTS sharing a few cores that
# spinning steals the cores from the other engines: measured here, the
# float32 LLM ran 3-4x slower with 2 threads on a busy CPU until the waiters
# were made passive.  Must be set before ctranslate2 is imported; a value the
# user set wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
