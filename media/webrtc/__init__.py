"""Browser callers over WebRTC (aiortc): one peer connection ↔ one Conversation."""
