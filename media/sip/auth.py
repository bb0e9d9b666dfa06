"""Who may place a call: a source allow-list (CIDRs) and optional digest authentication.

Digest: RFC 3261 §22.4 with RFC 2617/7616 §3.4 (MD5, qop=auth).  A captured
``Authorization`` must not place another call, so nonces are state, not
signed timestamps:

* each challenge issues a random nonce, remembered with its issue time and
  the highest nonce-count (``nc``) used with it;
* with qop=auth a nonce may be reused only with a higher ``nc`` (RFC 7616
  §3.4: the server "should" check nc to detect replays); without qop
  (RFC 2069 style) a nonce is single-use;
* a nonce older than ``ttl_s``, unknown (forgotten, from before a restart,
  or used up), or presented again with an ``nc`` already seen is answered
  with a fresh challenge marked ``stale=true`` when the response itself is
  right (RFC 7616 §3.3: the client may retry without asking its user), and
  refused as bad credentials otherwise;
* at most ``max_nonces`` are remembered, the oldest forgotten first, so a
  flood of unauthenticated INVITEs costs bounded memory (a legitimate
  caller whose nonce was pushed out gets ``stale=true`` and retries).
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from collections import OrderedDict

from sipmessage import AuthCredentials

NONCE_TTL_S = 300.0     # default seconds a nonce is good for (sip.nonce_ttl_s)
MAX_NONCES = 4096       # default nonces remembered (sip.max_nonces)


class SourceFilter:
    """The ``sip.allowed_sources`` allow-list: CIDRs (IPv4 or IPv6); empty allows everyone.

    Asked per INVITE (403) and, for TCP, when a connection is accepted
    (`transport.SipTransport` closes it at once).
    """

    def __init__(self, cidrs: list[str]):
        self.networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]

    def allows(self, host: str) -> bool:
        """Whether ``host`` (an IP address as text) may call; a name or garbage is refused."""
        if not self.networks:   # an empty list means everyone (say so in the log at start)
            return True
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped   # an IPv4 peer on a dual-stack socket
        return any(address in network for network in self.networks)


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


class DigestAuth:
    """Digest authentication of INVITEs for one user (see the module docstring for the nonce rules).

    ``clock`` gives seconds (monotonic by default) for nonce expiry.
    """

    def __init__(self, username: str, password: str, realm: str, *, ttl_s: float = NONCE_TTL_S,
                 max_nonces: int = MAX_NONCES, clock=time.monotonic):
        self.username, self.password, self.realm = username, password, realm
        self.ttl_s, self.max_nonces = ttl_s, max_nonces
        self._clock = clock
        self._nonces: OrderedDict[str, tuple[float, int]] = OrderedDict()   # nonce -> (issued, highest nc; -1 unused)

    def challenge(self, stale: bool = False) -> str:
        """A ``WWW-Authenticate`` value with a new nonce (``stale=true`` when asked)."""
        now = self._clock()
        while self._nonces:   # expired ones first, then the oldest while full
            oldest, (issued, _) = next(iter(self._nonces.items()))
            if now - issued <= self.ttl_s and len(self._nonces) < self.max_nonces:
                break
            del self._nonces[oldest]
        nonce = secrets.token_hex(16)
        self._nonces[nonce] = (now, -1)
        extra = ", stale=true" if stale else ""
        return f'Digest realm="{self.realm}", nonce="{nonce}", algorithm=MD5, qop="auth"{extra}'

    @property
    def nonces(self) -> int:
        """How many nonces are remembered now (at most ``max_nonces``)."""
        return len(self._nonces)

    def check(self, authorization: str | None, method: str) -> str:
        """Judge an ``Authorization`` value for ``method``: 'ok', 'missing', 'stale' or 'bad'.

        'stale' means the response is right but its nonce is expired,
        unknown, used up or its nc replayed: answer with a fresh
        ``challenge(stale=True)``.  'ok' consumes the nonce (or its nc).
        """
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
        if (p.get("algorithm") or "MD5").upper() != "MD5":
            return "bad"
        nonce, qop, nc_text = p.get("nonce") or "", p.get("qop"), p.get("nc") or ""
        ha1 = _md5(f"{self.username}:{self.realm}:{self.password}")
        ha2 = _md5(f"{method}:{p.get('uri', '')}")
        if qop:
            if qop.lower() != "auth" or len(nc_text) != 8 or not p.get("cnonce"):
                return "bad"
            try:
                nc = int(nc_text, 16)
            except ValueError:
                return "bad"
            expected = _md5(f"{ha1}:{nonce}:{nc_text}:{p.get('cnonce', '')}:{qop}:{ha2}")
        else:
            nc = 0
            expected = _md5(f"{ha1}:{nonce}:{ha2}")
        if not hmac.compare_digest(expected, (p.get("response") or "").lower()):
            return "bad"
        known = self._nonces.get(nonce)
        if known is None:
            return "stale"   # never ours, forgotten, or used up
        issued, highest = known
        if self._clock() - issued > self.ttl_s:
            del self._nonces[nonce]
            return "stale"
        if nc <= highest:
            return "stale"   # a replay: this nc (or a later one) was used already
        if qop:
            self._nonces[nonce] = (issued, nc)
        else:
            del self._nonces[nonce]   # no nc to count: one use
        return "ok"
