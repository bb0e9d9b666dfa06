"""WebSocket media streams: Twilio Media Streams (`twilio`) and plain PCM (`pcm`) around one call core (`call`)."""
