"""SIP messages: parsing (the `sipmessage` package) and building responses and requests.

`sipmessage` parses a datagram into headers and body and parses single
headers (Via, addresses, CSeq, URIs) on demand; everything that builds text
is here, copying the caller's header values verbatim, as a UAS must
(RFC 3261 §8.2.6).  What a UAS cannot do without — Via, From, To, Call-ID,
CSeq — is checked once by `parse_request`, so the rest of the code can rely
on it; a request that fails gets 400 if enough of it survives to address a
response (`salvage`), else nothing.  Every failure is a `BadRequest` whose
text is ours (it names the header, never echoes the input or a library's
internals), so it can go into the reason phrase.

Malformed kinds handled here: a bad or missing start line, a SIP version
other than 2.0 (505, §21.5.7), an empty, missing or unparsable Via, From,
To, Call-ID or CSeq, more than one From/To/Call-ID/CSeq (§7.3.1, §20), a
CSeq number outside 0..2**31-1 (§8.1.1.5) or whose method is not the
request's, a bad Max-Forwards, Contact or Record-Route, a Content-Length
that is missing a number, negative, conflicting, or longer than the body
(§18.3; a longer body is cut to Content-Length), and bytes that are not
UTF-8.  Folded header lines (§7.3.1: a line starting with a space or tab
continues the previous header) are unfolded first.
"""
from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import sipmessage
from sipmessage import URI, Address, Via

SERVER = "sub300"
ALLOW = "INVITE, ACK, BYE, CANCEL, OPTIONS, INFO"
_REQUEST_LINE = re.compile(r"^([A-Za-z]+) (\S+) SIP/(\d+\.\d+)$")
_LOOSE_REQUEST_LINE = re.compile(r"^[!%*+\-.`'~0-9A-Za-z_]+ ")   # a method token and a space: not a response
_START_LINE = re.compile(rb"^(?:[A-Za-z]+ \S+ SIP/2\.0|SIP/2\.0 [1-6]\d\d [^\r\n]*)$")
_ANY_VERSION = re.compile(rb"^(?:[A-Za-z]+ \S+ SIP/\d+\.\d+|SIP/\d+\.\d+ \d{3}(?: [^\r\n]*)?)$")
_FOLD = re.compile(rb"\r\n[ \t]+")
_HEADER_LINE = re.compile(rb"^[!-9;-~]+[ \t]*:")   # token, optional space, colon (§7.3.1)
_REASON_TEXT = re.compile(r"[^ -~]")
_CONTENT_LENGTH = re.compile(rb"^(?:content-length|l)[ \t]*:[ \t]*(.*?)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)
_COMPACT = {"v": "via", "f": "from", "t": "to", "i": "call-id", "l": "content-length"}
REASONS = {
    100: "Trying", 180: "Ringing", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    405: "Method Not Allowed", 420: "Bad Extension", 481: "Call/Transaction Does Not Exist", 483: "Too Many Hops",
    487: "Request Terminated", 488: "Not Acceptable Here", 491: "Request Pending", 500: "Server Internal Error",
    501: "Not Implemented", 503: "Service Unavailable", 505: "Version Not Supported", 513: "Message Too Large",
}
_ONCE = ("From", "To", "Call-ID", "CSeq")   # exactly one each (§8.1.1)


class BadRequest(ValueError):
    """A request we can answer, but only with 400 (the message says why)."""


@dataclass
class Request:
    """A parsed request with the headers a UAS needs already checked."""

    raw: sipmessage.Request
    method: str
    uri: URI
    vias: list[str]           # raw values, one per Via (comma-joined values split)
    top_via: Via
    from_: str
    to: str
    from_tag: str | None
    to_tag: str | None
    call_id: str
    cseq: int
    cseq_method: str
    body: bytes

    @property
    def branch(self) -> str:
        return self.top_via.parameters.get("branch") or ""

    def header(self, name: str) -> str | None:
        return self.raw.headers.get(name)

    def headers(self, name: str) -> list[str]:
        return self.raw.headers.getlist(name)


def content_length(head: bytes, absent: int = 0) -> int | str:
    """The Content-Length of a message head (``absent`` when there is none), or why it cannot frame a message.

    RFC 3261 §20.14: over TCP it is required (absent counts as 0); over UDP
    the body then runs to the end of the datagram (§18.3).

    Every Content-Length (or compact ``l``) header must be a non-negative
    decimal number, and all of them the same.
    """
    values = {m.group(1).strip() for m in _CONTENT_LENGTH.finditer(head.split(b"\r\n", 1)[-1])}
    if not values:
        return absent
    if len(values) > 1:
        return "conflicting Content-Length"
    (value,) = values
    if not value.isdigit():
        return "bad Content-Length"
    return int(value) if len(value) <= 12 else 10**12   # more than any message we take (and than int() parses)


def split_body(data: bytes) -> tuple[bytes, bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise BadRequest("no empty line after the headers (truncated message?)")
    return head, body


def parse(data: bytes) -> sipmessage.Request | sipmessage.Response:
    """Parse a whole message; `BadRequest` (a ValueError) naming what is malformed.

    The head is unfolded (§7.3.1) and must be UTF-8; the body is cut to
    Content-Length.
    """
    head, body = split_body(data)
    first, _, rest = head.partition(b"\r\n")
    if not _START_LINE.match(first):
        if _ANY_VERSION.match(first):
            raise BadRequest("SIP version not supported")
        raise BadRequest("bad start line")
    if rest[:1] in (b" ", b"\t"):
        raise BadRequest("folded line with no header to continue")
    rest = _FOLD.sub(b" ", rest)
    for line in rest.split(b"\r\n") if rest else []:
        if not _HEADER_LINE.match(line):
            raise BadRequest("bad header line")
    try:
        (first + b"\r\n" + rest).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("headers are not UTF-8") from None
    try:
        message = sipmessage.Message.parse(first + b"\r\n" + rest + b"\r\n\r\n")
    except Exception:
        raise BadRequest("unparsable message") from None
    n = content_length(b"x\r\n" + rest, absent=len(body))
    if isinstance(n, str):
        raise BadRequest(n)
    if n > len(body):
        raise BadRequest("body shorter than Content-Length (truncated message)")
    message.body = body[:n]
    return message


def check_request(message: sipmessage.Request) -> Request:
    """The headers every request needs, parsed; BadRequest names the first missing or broken one."""
    try:
        return _check_request(message)
    except BadRequest:
        raise
    except Exception:   # a library's error on input we did not foresee: still the sender's fault, still ours to word
        raise BadRequest("unparsable header") from None


def _port_ok(port: int | None) -> bool:
    return port is None or 0 < port < 65536


def _check_request(message: sipmessage.Request) -> Request:
    def need(name: str) -> str:
        values = [v.strip() for v in message.headers.getlist(name)]
        if not values or not values[0]:
            raise BadRequest(f"missing {name}")
        if len(values) > 1:
            raise BadRequest(f"more than one {name}")
        return values[0]

    vias: list[str] = []
    for value in message.headers.getlist("Via"):
        try:
            vias += [str(v) for v in Via.parse_many(value)]
        except ValueError:
            raise BadRequest("bad Via") from None
    if not vias:
        raise BadRequest("missing Via")
    try:
        top_via = Via.parse(vias[0])
    except ValueError:
        raise BadRequest("bad Via") from None
    if not top_via.host or not _port_ok(top_via.port):
        raise BadRequest("bad Via")
    from_, to, call_id, cseq = need("From"), need("To"), need("Call-ID"), need("CSeq")
    try:
        from_addr, to_addr = Address.parse(from_), Address.parse(to)
    except ValueError:
        raise BadRequest("bad From or To") from None
    number, _, method = cseq.partition(" ")
    if not number.strip().isdigit() or int(number) >= 2**31 or method.strip() != message.method:
        raise BadRequest("bad CSeq")
    max_forwards = message.headers.get("Max-Forwards")
    if max_forwards is not None and not (max_forwards.strip().isdigit() and int(max_forwards) <= 255):
        raise BadRequest("bad Max-Forwards")
    for name in ("Contact", "Record-Route"):
        for value in message.headers.getlist(name):
            if name == "Contact" and value.strip() == "*":
                continue
            try:
                addresses = Address.parse_many(value)
            except ValueError:
                raise BadRequest(f"bad {name}") from None
            if not addresses or not all(a.uri.host and _port_ok(a.uri.port) for a in addresses):
                raise BadRequest(f"bad {name}")
    return Request(
        raw=message, method=message.method, uri=message.uri, vias=vias, top_via=top_via,
        from_=from_, to=to, from_tag=from_addr.parameters.get("tag"), to_tag=to_addr.parameters.get("tag"),
        call_id=call_id, cseq=int(number), cseq_method=method.strip(), body=message.body,
    )


def fix_top_via(via: str, source: tuple[str, int]) -> str:
    """RFC 3261 §18.2.1 `received` and RFC 3581 `rport`: so the response finds a caller behind NAT."""
    parsed = Via.parse(via)
    params = dict(parsed.parameters)
    if "rport" in params:
        params["rport"] = str(source[1])
        params["received"] = source[0]
    elif parsed.host != source[0]:
        params["received"] = source[0]
    return str(Via(transport=parsed.transport, host=parsed.host, port=parsed.port,
                   parameters=sipmessage.Parameters(**params)))


def response_destination(request: Request, source: tuple[str, int]) -> tuple[str, int]:
    """Where a UDP response goes: the source address, and with rport the source port too."""
    via = request.top_via
    if "rport" in via.parameters:
        return source
    return source[0], via.port or 5060


def new_tag() -> str:
    return secrets.token_hex(6)


def new_branch() -> str:
    return "z9hG4bK" + secrets.token_hex(10)


def response(request: Request, source: tuple[str, int], status: int, *, to_tag: str | None = None,
             headers: Sequence[tuple[str, str]] = (), body: bytes = b"", content_type: str | None = None,
             record_route: bool = False) -> bytes:
    vias = [fix_top_via(request.vias[0], source)] + request.vias[1:]
    to = request.to
    if to_tag and request.to_tag is None and status != 100:
        to = f"{to};tag={to_tag}"
    lines = [f"SIP/2.0 {status} {REASONS.get(status, 'Unknown')}"]
    lines += [f"Via: {v}" for v in vias]
    if record_route:
        lines += [f"Record-Route: {r}" for r in request.headers("Record-Route")]
    lines += [f"From: {request.from_}", f"To: {to}", f"Call-ID: {request.call_id}",
              f"CSeq: {request.cseq} {request.cseq_method}", f"Server: {SERVER}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body:
        lines.append(f"Content-Type: {content_type or 'application/sdp'}")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def request(method: str, uri: str, *, via: str, from_: str, to: str, call_id: str, cseq: int,
            routes: Sequence[str] = (), headers: Sequence[tuple[str, str]] = (), body: bytes = b"") -> bytes:
    lines = [f"{method} {uri} SIP/2.0", f"Via: {via}", "Max-Forwards: 70"]
    lines += [f"Route: {r}" for r in routes]
    lines += [f"From: {from_}", f"To: {to}", f"Call-ID: {call_id}", f"CSeq: {cseq} {method}",
              f"User-Agent: {SERVER}"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def salvage_for_400(data: bytes, source: tuple[str, int], reason: str) -> tuple[bytes, tuple[str, int]] | None:
    """A 400 for a request too broken to parse (see `salvage`); ``reason`` is the whole reason phrase."""
    return salvage(data, source, 400, reason)


def salvage(data: bytes, source: tuple[str, int], status: int, reason: str) -> tuple[bytes, tuple[str, int]] | None:
    """An error response for a request too broken to parse: (bytes, where to send it), or None.

    None when nothing may or can answer: not a request (a response, or a
    first line that is not a method token and a space), an ACK
    (§17.1.1.3), or one of Via, From, To, Call-ID, CSeq
    missing, empty or (Via) unusable.  A request line with a SIP version
    other than 2.0 gets 505 whatever ``status`` was asked (§21.5.7).
    ``reason`` becomes the reason phrase: printable ASCII, at most 100
    characters.  Never raises.
    """
    try:
        return _salvage(data, source, status, reason)
    except Exception:   # this runs on the error path: it must not become one
        return None


def _salvage(data: bytes, source: tuple[str, int], status: int, reason: str) -> tuple[bytes, tuple[str, int]] | None:
    text = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    lines = re.split(r"\r?\n", text)
    first = lines[0].strip() if lines else ""
    if first.startswith("SIP/") or not _LOOSE_REQUEST_LINE.match(first) or first.upper().startswith("ACK "):
        return None   # a response, not a request line, or an ACK: nothing may answer
    match = _REQUEST_LINE.match(first)
    if match is not None and match.group(3) != "2.0":
        status, reason = 505, REASONS[505]
    found: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or name[:1] in (" ", "\t"):
            continue
        key = name.strip().lower()
        key = _COMPACT.get(key, key)
        if value.strip():
            found.setdefault(key, []).append(value.strip())
    if not all(found.get(k) for k in ("via", "from", "to", "call-id", "cseq")):
        return None
    try:
        top = Via.parse_many(found["via"][0])[0]
    except (ValueError, IndexError):
        return None
    if not top.host:
        return None
    dest = source if "rport" in top.parameters else (source[0], top.port or 5060)
    reason = _REASON_TEXT.sub(" ", reason)[:100].strip() or REASONS.get(status, "Error")
    out = [f"SIP/2.0 {status} {reason}"] + [f"Via: {v}" for v in found["via"]]
    out += [f"From: {found['from'][0]}", f"To: {found['to'][0]}", f"Call-ID: {found['call-id'][0]}",
            f"CSeq: {found['cseq'][0]}", f"Server: {SERVER}", "Content-Length: 0"]
    return ("\r\n".join(out) + "\r\n\r\n").encode(), dest
