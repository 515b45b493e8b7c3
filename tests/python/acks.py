"""Waiting for the server's subscription acknowledgement with the published client.

`AsyncWSEClient.subscribe()` records a topic as subscribed as soon as the request is *sent*, and
consumes the server's `subscription_update` reply internally (it never reaches `recv()` or
handlers). The only public trace of the reply is the client's own log line
"Subscribed to: [topics]" on the `wse_client` logger, so the scripts listen for that: publishing
before the reply has been seen races the server registering the subscription.
"""

import asyncio
import logging


class SubscriptionAcks(logging.Handler):
    """Collects the topics the server has acknowledged, as the client logs them."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.topics = set()
        self._changed = asyncio.Event()
        log = logging.getLogger("wse_client")
        log.setLevel(logging.DEBUG)
        log.addHandler(self)

    def emit(self, record):
        # The client logs from its receive loop, on the event loop's thread.
        if record.msg == "Subscribed to: %s" and record.args:
            self.topics.update(record.args[0])
            self._changed.set()

    async def wait(self, topic, timeout):
        async def until_acked():
            while topic not in self.topics:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(until_acked(), timeout)
