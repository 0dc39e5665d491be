"""The Python binding against a real `pingme serve` (started by test.sh,
which passes its addresses in PINGME_API, PINGME_TCP, PINGME_TLS,
PINGME_QUIC and PINGME_WS and puts the generated `pingme` module on
PYTHONPATH). Plain unittest on asyncio, no packages to install.

Every wait is for an event, bounded by a generous timeout; nothing sleeps.
"""

import asyncio
import os
import sys
import unittest

import pingme
from pingme import ClientEvent, ConnectConfig, ContentType, PingmeError, Trust, Watermark

API = os.environ["PINGME_API"]
GATEWAYS = {
    "tcp": f"tcp://{os.environ['PINGME_TCP']}",
    "tls": f"tls://{os.environ['PINGME_TLS']}",
    "quic": f"quic://{os.environ['PINGME_QUIC']}",
    "ws": os.environ["PINGME_WS"],
}
# Events arrive within milliseconds; the bound only turns a hang into a
# failure on a loaded machine.
TIMEOUT = 30
# Names unique per run, so the test also runs against a long-lived server.
RUN = f"{os.getpid()}x{id(object()) % 10_000}"
PASSWORD = "correct horse battery"


async def next_event(client):
    event = await asyncio.wait_for(client.next_event(), TIMEOUT)
    if event is None:
        raise AssertionError("the client stopped")
    if event.is_closed():
        raise AssertionError(f"the client closed: {event.reason}")
    return event


async def until_synced(client):
    """The messages the sync after a connect delivered, in event order."""
    messages = []
    while True:
        event = await next_event(client)
        if event.is_synced():
            return messages
        if event.is_message():
            messages.append(event.message)


async def next_message(client):
    """The next message from another user. The client does not count its
    own acknowledged sends as held, so a later gap fetch may bring them
    back (docs/protocol.md, "Own messages"); they are not what a test of
    delivery waits for."""
    while True:
        event = await next_event(client)
        if event.is_message() and event.message.sender_id != client.user_id():
            return event.message


class User:
    """A registered user of this run."""

    def __init__(self, sdk, name):
        self.sdk = sdk
        self.name = f"{name}-{RUN}"

    async def register(self):
        self.user_id = await self.sdk.register(self.name, PASSWORD)
        return self

    async def connect(self, transport, device, **config):
        login = await self.sdk.login(self.name, PASSWORD, device)
        self.token = login.token
        assert login.user_id == self.user_id
        client = await self.sdk.connect(
            ConnectConfig(
                gateway=GATEWAYS[transport],
                token=login.token,
                # The test server's self-signed development certificate.
                trust=Trust.DEV_CERTIFICATE(),
                **config,
            )
        )
        assert client.user_id() == self.user_id
        assert client.device_id() == device
        return client


class BindingTest(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self):
        self.sdk = pingme.Pingme(API)
        self.clients = []

    async def asyncTearDown(self):
        for client in self.clients:
            await asyncio.wait_for(client.close(), TIMEOUT)

    async def connect(self, user, transport, device, **config):
        client = await user.connect(transport, device, **config)
        self.clients.append(client)
        return client

    async def test_direct_chat_both_ways_over_every_transport(self):
        alice = await User(self.sdk, "alice").register()
        bob = await User(self.sdk, "bob").register()
        dm = pingme.direct_conversation_id(bob.user_id, alice.user_id)
        self.assertEqual(dm, f"dm:{min(alice.user_id, bob.user_id)}:{max(alice.user_id, bob.user_id)}")
        sent = []
        for transport in ["tcp", "quic", "tls", "ws"]:
            with self.subTest(transport=transport):
                a = await self.connect(alice, transport, f"laptop-{transport}")
                b = await self.connect(bob, transport, f"phone-{transport}")
                # A new device first syncs what the conversation already
                # holds: every earlier round's messages, in order.
                self.assertEqual([m.body for m in await until_synced(b)], sent)
                await until_synced(a)

                ack = await a.send_text(dm, f"hi bob over {transport}")
                message = await next_message(b)
                self.assertEqual(
                    (message.conversation_id, message.seq, message.sender_id, message.msg_id),
                    (dm, ack.seq, alice.user_id, ack.msg_id),
                )
                self.assertEqual(message.body, f"hi bob over {transport}".encode())
                self.assertEqual(message.content_type, ContentType.TEXT)
                self.assertEqual(message.sender_device, f"laptop-{transport}")

                reply = await b.send(dm, ContentType.CUSTOM, b"\x00\x01binary")
                self.assertEqual(reply.seq, ack.seq + 1)
                message = await next_message(a)
                self.assertEqual((message.seq, message.sender_id), (reply.seq, bob.user_id))
                self.assertEqual((message.content_type, message.body), (ContentType.CUSTOM, b"\x00\x01binary"))
                self.assertGreaterEqual(b.watermark(dm), ack.seq)
                sent += [f"hi bob over {transport}".encode(), b"\x00\x01binary"]

                await a.close()
                await b.close()

    async def test_a_network_change_keeps_the_quic_session(self):
        hana = await User(self.sdk, "hana").register()
        ivan = await User(self.sdk, "ivan").register()
        dm = pingme.direct_conversation_id(hana.user_id, ivan.user_id)
        a = await self.connect(hana, "quic", "phone")
        b = await self.connect(ivan, "quic", "phone")
        await until_synced(a)
        await until_synced(b)
        for round in range(3):
            before = a.local_address()
            after = a.network_changed()
            self.assertIsNotNone(after)
            self.assertNotEqual(after, before)
            self.assertEqual(a.local_address(), after)
            ack = await a.send_text(dm, f"moved {round}")
            message = await next_message(b)
            self.assertEqual((message.seq, message.body), (ack.seq, f"moved {round}".encode()))
            reply = await b.send_text(dm, f"seen {round}")
            # The same session: no reconnect before the reply arrives.
            while True:
                event = await next_event(a)
                self.assertFalse(event.is_reconnecting() or event.is_connected(), event)
                if event.is_message() and event.message.sender_id == ivan.user_id:
                    self.assertEqual(event.message.seq, reply.seq)
                    break

    async def test_offline_device_syncs_missed_messages_in_order_exactly_once(self):
        carol = await User(self.sdk, "carol").register()
        dave = await User(self.sdk, "dave").register()
        dm = pingme.direct_conversation_id(carol.user_id, dave.user_id)
        c = await self.connect(carol, "tcp", "desktop")
        await until_synced(c)
        # Carol's other device hears her sends live: once it has the last
        # one, the fanout of all five is over, so none reaches Dave's
        # reconnected phone live, ahead of its sync.
        tablet = await self.connect(carol, "ws", "tablet")
        await until_synced(tablet)

        # Dave's phone was online once, then went offline.
        d = await self.connect(dave, "quic", "phone")
        self.assertEqual(await until_synced(d), [])
        await d.close()

        acks = [await c.send_text(dm, f"missed {i}") for i in range(1, 6)]
        self.assertEqual([ack.seq for ack in acks], [1, 2, 3, 4, 5])
        seen = []
        while 5 not in seen:
            event = await next_event(tablet)
            if event.is_message():
                seen.append(event.message.seq)

        # Back online: the sync brings each missed message once, in order.
        d = await self.connect(dave, "quic", "phone")
        synced = await until_synced(d)
        self.assertEqual([(m.seq, m.body) for m in synced], [(i, f"missed {i}".encode()) for i in range(1, 6)])
        self.assertEqual([m.msg_id for m in synced], [ack.msg_id for ack in acks])
        self.assertEqual(d.watermarks(), [Watermark(conversation_id=dm, seq=5)])
        # Exactly once: the next message is the next live one, no repeat.
        marker = await c.send_text(dm, "live")
        message = await next_message(d)
        self.assertEqual((message.seq, message.body), (marker.seq, b"live"))

        # A restart that passes the persisted watermarks syncs nothing old.
        saved = d.watermarks()
        await d.close()
        d = await self.connect(dave, "tcp", "phone", watermarks=saved)
        self.assertEqual(await until_synced(d), [])
        page = await d.fetch(dm, 0, 0, 0)
        self.assertEqual([m.seq for m in page.messages], [1, 2, 3, 4, 5, 6])
        self.assertFalse(page.has_more)

    async def test_group_messages_reach_members(self):
        erin = await User(self.sdk, "erin").register()
        frank = await User(self.sdk, "frank").register()
        e = await self.connect(erin, "tcp", "laptop")
        f = await self.connect(frank, "quic", "phone")
        group = await self.sdk.create_group(erin.token, "hikers", [frank.user_id])
        self.assertEqual(group.member_count, 2)
        self.assertEqual(group.conversation_id, f"g:{group.group_id}")
        await until_synced(e)
        await until_synced(f)

        ack = await e.send_text(group.conversation_id, "summit at noon")
        message = await next_message(f)
        self.assertEqual((message.conversation_id, message.seq, message.body), (group.conversation_id, ack.seq, b"summit at noon"))
        ack = await f.send_text(group.conversation_id, "see you there")
        message = await next_message(e)
        self.assertEqual((message.sender_id, message.seq), (frank.user_id, ack.seq))

        presence = await e.query_presence([frank.user_id])
        self.assertEqual([(p.user_id, p.online) for p in presence], [(frank.user_id, True)])

    async def test_errors_carry_the_stable_codes(self):
        grace = await User(self.sdk, "grace").register()
        with self.assertRaises(PingmeError.Api) as caught:
            await self.sdk.register(grace.name, PASSWORD)
        self.assertEqual((caught.exception.code, caught.exception.name), (10008, "USERNAME_TAKEN"))
        with self.assertRaises(PingmeError.Api) as caught:
            await self.sdk.login(grace.name, "wrong password", "phone")
        self.assertEqual((caught.exception.status, caught.exception.code), (401, 10006))

        g = await self.connect(grace, "tcp", "phone")
        with self.assertRaises(PingmeError.Server) as caught:
            await g.send_text("g:999999999", "into the void")
        self.assertNotEqual(caught.exception.code, 0)
        self.assertNotEqual(caught.exception.name, "")

        login = await self.sdk.login(grace.name, PASSWORD, "tablet")
        with self.assertRaises(PingmeError.InvalidArgument):
            await self.sdk.connect(ConnectConfig(gateway=GATEWAYS["quic"], token=login.token))
        with self.assertRaises(PingmeError.Server) as caught:
            await self.sdk.connect(ConnectConfig(gateway=GATEWAYS["tcp"], token="not a token"))
        self.assertEqual((caught.exception.code, caught.exception.name), (10002, "TOKEN_INVALID"))


def main():
    suite = unittest.defaultTestLoader.loadTestsFromTestCase(BindingTest)
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    failed = len(result.failures) + len(result.errors)
    print(f"bindings: {result.testsRun - failed} passed, {failed} failed")
    sys.exit(0 if result.wasSuccessful() and result.testsRun > 0 else 1)


if __name__ == "__main__":
    main()
