"""aiohttp application: signalling, demo page, metrics, OpenAI-compatible endpoint."""
