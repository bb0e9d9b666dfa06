"""Who may place a call: a source allow-list (CIDRs) and optional digest authentication (RFC 8760/2617, MD5, qop=auth).

Nonces are stateless: a timestamp signed with a per-process secret, so a
flood of INVITEs costs no memory; a nonce older than NONCE_TTL_S is
answered with a fresh challenge marked stale.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time

from sipmessage import AuthCredentials

NONCE_TTL_S = 300


class SourceFilter:
    def __init__(self, cidrs: list[str]):
        self.networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]

    def allows(self, host: str) -> bool:
        if not self.networks:   # an empty list means everyone (say so in the log at start)
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.networks)


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


class DigestAuth:
    def __init__(self, username: str, password: str, realm: str, clock=time.time):
        self.username, self.password, self.realm = username, password, realm
        self._secret = secrets.token_bytes(16)
        self._clock = clock

    def _sign(self, stamp: str) -> str:
        return hmac.new(self._secret, stamp.encode(), hashlib.sha256).hexdigest()[:20]

    def challenge(self, stale: bool = False) -> str:
        stamp = str(int(self._clock()))
        nonce = f"{stamp}.{self._sign(stamp)}"
        extra = ", stale=true" if stale else ""
        return f'Digest realm="{self.realm}", nonce="{nonce}", algorithm=MD5, qop="auth"{extra}'

    def check(self, authorization: str | None, method: str) -> str:
        """'ok', 'missing', 'stale' or 'bad'."""
        if not authorization:
            return "missing"
        try:
            creds = AuthCredentials.parse(authorization)
        except ValueError:
            return "bad"
        p = creds.parameters
        if p is None:
            return "bad"
        if creds.scheme.lower() != "digest" or p.get("username") != self.username or p.get("realm") != self.realm:
            return "bad"
        nonce = p.get("nonce") or ""
        stamp, _, sig = nonce.partition(".")
        if not stamp.isdigit() or not hmac.compare_digest(sig, self._sign(stamp)):
            return "bad"
        ha1 = _md5(f"{self.username}:{self.realm}:{self.password}")
        ha2 = _md5(f"{method}:{p.get('uri', '')}")
        if p.get("qop"):
            expected = _md5(f"{ha1}:{nonce}:{p.get('nc', '')}:{p.get('cnonce', '')}:{p.get('qop')}:{ha2}")
        else:
            expected = _md5(f"{ha1}:{nonce}:{ha2}")
        if not hmac.compare_digest(expected, (p.get("response") or "").lower()):
            return "bad"
        if self._clock() - int(stamp) > NONCE_TTL_S:
            return "stale"
        return "ok"
