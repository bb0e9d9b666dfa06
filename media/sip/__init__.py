"""Phone calls: a SIP user agent server (UDP and TCP) with G.711 RTP media.

A call from a SIP gateway (carrier trunk, PBX, Kamailio) reaches the same
`Conversation` as a browser call.  Layout: `message` (parsing and building
SIP text), `auth` (who may call), `sdp` (offer/answer), `g711`, `dtmf`,
`jitter` and `rtp` (media), `call` (one call's media loop around a
Conversation), `dialogs` (RFC 3261 transactions and dialogs), `transport`
(UDP/TCP sockets), `service` (the entry point `start_sip_service`).
"""
