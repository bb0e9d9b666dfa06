"""The conversation: turn state machine, pipeline stages, latency ledger, config, CLI.

Knows no transport: it consumes 16 kHz mono PCM frames with arrival
timestamps and writes audio to a sink that can be flushed.
"""
