"""The embedded default's channel layer: channels' in-memory layer, minus a scan on every call."""

import time

from channels.layers import InMemoryChannelLayer


class EmbeddedChannelLayer(InMemoryChannelLayer):
    """
    channels' InMemoryChannelLayer walks every channel's queue and every group membership for expired entries
    on each send, group_send and receive: with a thousand open sockets that scan is the largest cost of the
    Daphne process under load (BENCHMARKS.md). Expiry is a matter of a minute (messages) and a day (groups), so
    scanning once a second loses nothing.
    """

    CLEAN_EVERY = 1.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cleaned_at = float("-inf")

    def _clean_expired(self):
        now = time.monotonic()
        if now - self._cleaned_at < self.CLEAN_EVERY:
            return
        self._cleaned_at = now
        super()._clean_expired()
