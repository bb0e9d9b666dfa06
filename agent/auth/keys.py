"""API keys: scopes, the stored form (hashed), and where keys are kept (`KeyStore`)."""
from __future__ import annotations

import hashlib
import hmac
import secrets
import time
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


# ------------------------------------------------------------------ secrets
#: every secret starts with this, so a leaked one is recognisable (secret scanners, logs)
SECRET_PREFIX = "s300_"
#: random bytes in a secret: 32 bytes = 256 bits of entropy (`secrets.token_urlsafe`)
SECRET_BYTES = 32
#: random bytes in a key id (public: 64 bits, hex)
ID_BYTES = 8


class BadScopes(ValueError):
    """A scope list that names something outside `SCOPES`, or nothing at all."""


def parse_scopes(text: str | list[str] | tuple[str, ...] | frozenset[str]) -> frozenset[str]:
    """"calls,model" (or a list) → frozenset of scopes; `BadScopes` for an unknown or empty one."""
    items = text.split(",") if isinstance(text, str) else list(text)
    scopes = frozenset(s.strip() for s in items if s.strip())
    unknown = sorted(scopes - set(SCOPES))
    if unknown:
        raise BadScopes(f"unknown scope {', '.join(map(repr, unknown))} (scopes: {', '.join(SCOPES)})")
    if not scopes:
        raise BadScopes(f"no scope given (scopes: {', '.join(SCOPES)})")
    return scopes


def hash_secret(secret: str) -> str:
    """Hex SHA-256 of a secret: the only form of it that is stored.

    A plain, unsalted SHA-256 is the right tool here, not a password hash
    (bcrypt, scrypt, Argon2): the secret is 256 random bits from `secrets`,
    so neither a dictionary nor brute force can invert it, and a slow hash
    would only cost every request time.  GitHub's token scanning and
    Stripe's API keys store high-entropy secrets the same way.
    """
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def key_id_of(secret: str) -> str | None:
    """The key id inside ``s300_<id>_<random>``, or None when the text is not shaped like our secret."""
    if not secret.startswith(SECRET_PREFIX):
        return None
    key_id, sep, random_part = secret[len(SECRET_PREFIX):].partition("_")
    if not sep or len(key_id) != 2 * ID_BYTES or not random_part:
        return None
    try:
        int(key_id, 16)
    except ValueError:
        return None
    return key_id


def new_key(name: str, scopes: str | list[str] | frozenset[str], *, record_audio: bool = False,
            now: float | None = None) -> tuple[ApiKey, str]:
    """A fresh key and its secret ``s300_<16 hex id>_<43 base64url chars>`` (256 random bits).

    The secret is returned once, to be shown once; only its hash is in the
    `ApiKey`.  Raises `BadScopes`.
    """
    key_id = secrets.token_hex(ID_BYTES)
    secret = f"{SECRET_PREFIX}{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"
    key = ApiKey(id=key_id, name=name, scopes=parse_scopes(scopes), secret_hash=hash_secret(secret),
                 created_at=time.time() if now is None else now, record_audio=record_audio)
    return key, secret


def verify_secret(secret: str, store: KeyStore) -> ApiKey | None:
    """The key whose secret this is (active or revoked: the caller decides), or None.

    Looked up by the id in the secret, then its stored hash compared with
    `hmac.compare_digest` (constant time: how long the comparison takes says
    nothing about how much of the hash matched).  Blocking (the store).
    """
    key_id = key_id_of(secret)
    if key_id is None:
        return None
    key = store.key_by_id(key_id)
    if key is None:
        return None
    return key if hmac.compare_digest(key.secret_hash, hash_secret(secret)) else None
