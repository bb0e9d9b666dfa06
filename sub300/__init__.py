"""sub300: a real-time voice agent server.

One import name for the whole program.  The folders of the source tree map
onto it (see ``pyproject.toml``)::

    sub300.models   model engines (VAD, STT, LLM, TTS) behind small Protocols
    sub300.agent    the transport-free conversation: turns, barge-in, ledger
    sub300.media    transports: WAV files, WebRTC (aiortc), SIP + RTP
    sub300.web      the aiohttp app: demo page, signalling, metrics, OpenAI API
    sub300.cli      the composition root: the ``sub300`` command
    sub300.testing  fakes, a virtual clock and scripted callers for tests

Imports point down only: ``models`` <- ``agent`` <- ``media``/``web`` <- ``cli``.
"""

__version__ = "0.1.0"
