"""SIP: the INVITE rate limit per source address (auth.sip_invites_per_minute) — 503 with Retry-After.

Only new INVITEs count: a retransmission (same branch) gets the same answer again and a re-INVITE in a
dialog passes.  The call's observers hear its source in the CallContext.  No model: `EchoAgent` calls.
"""
from __future__ import annotations

import copy

from .test_sip_protocol import Client, header, in_dialog, invite
from .test_sip_support import echo_calls, sip_service


async def test_invite_rate_limit_per_source(config):
    config = copy.deepcopy(config)
    config.auth.sip_invites_per_minute = 2
    async with sip_service(config, call_factory=echo_calls) as (service, observer):
        contexts = {}
        started = observer.call_started

        def call_started(transport, call_id, context=None):
            contexts[call_id] = context
            return started(transport, call_id, context)

        observer.call_started = call_started
        client = await Client.open(service.address)
        client.send(invite(client, call_id="a", branch="z9hG4bK-a"))
        ok = await client.expect(200, timeout=10)
        client.send(invite(client, call_id="a", branch="z9hG4bK-a"))            # retransmission: not counted
        await client.expect(200)
        client.send(in_dialog(client, "ACK", ok, 1))
        tag = ";tag=" + header(ok, "To").split("tag=")[1]
        client.send(invite(client, call_id="a", branch="z9hG4bK-re", cseq=2, to_tag=tag))   # re-INVITE
        ok2 = await client.expect(200)
        client.send(in_dialog(client, "ACK", ok2, 2))
        client.send(invite(client, call_id="b", branch="z9hG4bK-b"))             # the 2nd new INVITE
        await client.expect(200, timeout=10)
        client.send(invite(client, call_id="c", branch="z9hG4bK-c"))             # the 3rd: refused
        refused = await client.expect(503)
        assert 1 <= int(header(refused, "Retry-After")) <= 60
        assert "INVITEs per minute" in header(refused, "Warning")
        assert "c" not in contexts and len(service.uas.dialogs) == 2
        assert contexts["a"].source == "127.0.0.1" and contexts["a"].key_id is None
        client.close()
