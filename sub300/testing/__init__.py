"""Test and benchmark helpers that users may reuse for their own agents.

Not used by the server itself: scripted callers (in-process and over
WebRTC), named fakes of the engines, a virtual clock, and the WER used by
the speech-recognition benchmark.
"""
