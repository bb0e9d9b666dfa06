"""Transports and audio plumbing: files, WebRTC (aiortc), SIP + RTP."""
