"""Model engines shared by all sessions of a process.

Nothing here imports `agent`, `media` or `web`: engines see numpy arrays,
strings and paths, never a session or a transport.
"""
