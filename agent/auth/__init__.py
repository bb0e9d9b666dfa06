"""Who may call: API keys with scopes, call tokens, TURN credentials, limits per key and per source."""
