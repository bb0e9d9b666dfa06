"""SIP messages: parsing (the `sipmessage` package) and building responses and requests.

`sipmessage` parses a datagram into headers and body and parses single
headers (Via, addresses, CSeq, URIs) on demand; everything that builds text
is here, copying the caller's header values verbatim, as a UAS must
(RFC 3261 §8.2.6).  What a UAS cannot do without — Via, From, To, Call-ID,
CSeq — is checked once by `parse_request`, so the rest of the code can rely
on it; a request that fails gets 400 if enough of it survives to address a
response (`salvage_for_400`).
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
_REQUEST_LINE = re.compile(r"^([A-Za-z]+) (\S+) SIP/2\.0$")
_COMPACT = {"v": "via", "f": "from", "t": "to", "i": "call-id", "l": "content-length"}
REASONS = {
    100: "Trying", 180: "Ringing", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    405: "Method Not Allowed", 420: "Bad Extension", 481: "Call/Transaction Does Not Exist", 483: "Too Many Hops",
    487: "Request Terminated", 488: "Not Acceptable Here", 491: "Request Pending", 500: "Server Internal Error",
    501: "Not Implemented", 503: "Service Unavailable",
}


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


def split_body(data: bytes) -> tuple[bytes, bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise BadRequest("no empty line after the headers (truncated message?)")
    return head, body


def parse(data: bytes) -> sipmessage.Request | sipmessage.Response:
    """Parse a whole message; ValueError (or BadRequest) on anything malformed."""
    head, body = split_body(data)
    message = sipmessage.Message.parse(head + b"\r\n\r\n")
    length = message.headers.get("Content-Length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise BadRequest("bad Content-Length") from None
        if n > len(body):
            raise BadRequest("body shorter than Content-Length (truncated message)")
        body = body[:n]
    message.body = body
    return message


def check_request(message: sipmessage.Request) -> Request:
    """The headers every request needs, parsed; BadRequest names the first missing or broken one."""
    def need(name: str) -> str:
        value = message.headers.get(name)
        if not value:
            raise BadRequest(f"missing {name}")
        return value

    vias: list[str] = []
    for value in message.headers.getlist("Via"):
        try:
            vias += [str(v) for v in Via.parse_many(value)]
        except ValueError:
            raise BadRequest("bad Via") from None
    if not vias:
        raise BadRequest("missing Via")
    from_, to, call_id, cseq = need("From"), need("To"), need("Call-ID"), need("CSeq")
    try:
        from_addr, to_addr = Address.parse(from_), Address.parse(to)
    except ValueError:
        raise BadRequest("bad From or To") from None
    number, _, method = cseq.partition(" ")
    if not number.strip().isdigit() or method.strip() != message.method:
        raise BadRequest("bad CSeq")
    return Request(
        raw=message, method=message.method, uri=message.uri, vias=vias, top_via=Via.parse(vias[0]),
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
    """A 400 for a request too broken to parse, if its first line and the five key headers survive."""
    try:
        text = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    except Exception:
        return None
    lines = re.split(r"\r?\n", text)
    match = _REQUEST_LINE.match(lines[0].strip()) if lines else None
    if match is None or match.group(1).upper() == "ACK":
        return None   # a response, garbage, or an ACK: nothing may answer
    found: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            continue
        key = name.strip().lower()
        key = _COMPACT.get(key, key)
        found.setdefault(key, []).append(value.strip())
    if not all(found.get(k) for k in ("via", "from", "to", "call-id", "cseq")):
        return None
    try:
        top = Via.parse_many(found["via"][0])[0]
    except ValueError:
        return None
    dest = source if "rport" in top.parameters else (source[0], top.port or 5060)
    reason = re.sub(r"[\r\n]", " ", reason)[:100]
    out = [f"SIP/2.0 400 {reason}"] + [f"Via: {v}" for v in found["via"]]
    out += [f"From: {found['from'][0]}", f"To: {found['to'][0]}", f"Call-ID: {found['call-id'][0]}",
            f"CSeq: {found['cseq'][0]}", f"Server: {SERVER}", "Content-Length: 0"]
    return ("\r\n".join(out) + "\r\n\r\n").encode(), dest
