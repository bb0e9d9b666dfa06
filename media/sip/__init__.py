"""Phone calls: a SIP user agent server (UDP and TCP) with G.711 RTP media.

A call from a SIP gateway (carrier trunk, PBX, Kamailio) reaches an agent —
in the server the same `Conversation` as a browser call.  Layout, bottom up:
`message` (parsing and building SIP text), `transport` (UDP/TCP sockets),
`transactions` (RFC 3261 §17: retransmissions and their timers), `auth`
(who may call), `sdp` (offer/answer), `g711`, `dtmf`, `jitter` and `rtp`
(media), `call` (one call's 20 ms media loop around an agent, and the
`CallFactory` that makes the agent), `dialogs` (the user agent server:
INVITE … BYE), `service` (the entry point `start_sip_service`, where the
engines are wired in).  Nothing below `service` imports an engine.
"""
