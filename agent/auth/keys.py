"""API keys: scopes, the stored form (hashed), and where keys are kept (`KeyStore`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

#: calls: start calls (/offer, WebSocket, minting call tokens) · model: /v1/* model endpoints ·
#: usage: read usage · admin: manage keys, export and erase calls
SCOPES = ("calls", "model", "usage", "admin")


@dataclass(frozen=True)
class ApiKey:
    """One API key as stored: never its secret, only the secret's hash.

    ``id``: public, stable (in tokens, records and logs); ``secret_hash``:
    hex SHA-256 of the secret; times are Unix epoch seconds.
    """

    id: str
    name: str
    scopes: frozenset[str]
    secret_hash: str
    created_at: float
    revoked_at: float | None = None
    record_audio: bool = False

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class KeyStore(Protocol):
    """Where keys are kept: the records database (agent/records) or memory (tests). Blocking calls."""

    def add_key(self, key: ApiKey) -> None: ...

    def key_by_id(self, key_id: str) -> ApiKey | None: ...

    def key_by_hash(self, secret_hash: str) -> ApiKey | None: ...

    def revoke_key(self, key_id: str, at: float) -> bool:
        """True when the key existed and was active."""
        ...

    def list_keys(self) -> list[ApiKey]: ...
