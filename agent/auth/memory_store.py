"""`MemoryKeyStore`: the `KeyStore` protocol in a dict, for tests and embedding; nothing survives the process."""
from __future__ import annotations

import dataclasses
import threading

from .keys import ApiKey


class MemoryKeyStore:
    """Keys in memory, by id and by secret hash; thread-safe (the web app reads it from worker threads)."""

    def __init__(self, keys: list[ApiKey] | None = None) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, ApiKey] = {}
        for key in keys or []:
            self.add_key(key)

    def add_key(self, key: ApiKey) -> None:
        """Raises `ValueError` when the id or the secret hash is taken."""
        with self._lock:
            if key.id in self._keys or any(k.secret_hash == key.secret_hash for k in self._keys.values()):
                raise ValueError(f"key {key.id} exists")
            self._keys[key.id] = key

    def key_by_id(self, key_id: str) -> ApiKey | None:
        with self._lock:
            return self._keys.get(key_id)

    def key_by_hash(self, secret_hash: str) -> ApiKey | None:
        with self._lock:
            return next((k for k in self._keys.values() if k.secret_hash == secret_hash), None)

    def revoke_key(self, key_id: str, at: float) -> bool:
        with self._lock:
            key = self._keys.get(key_id)
            if key is None or not key.active:
                return False
            self._keys[key_id] = dataclasses.replace(key, revoked_at=at)
            return True

    def list_keys(self) -> list[ApiKey]:
        with self._lock:
            return sorted(self._keys.values(), key=lambda k: (k.created_at, k.id))
