"""What one connection knows about the prompts on its server: the ledger its pieces share and none of them owns."""

import time

# Bound on the per-prompt memory of what the socket heard.
HEARD_LIMIT = 10_000
STRANGERS_LIMIT = 10_000


class Prompts:
    def __init__(self):
        self.tasks = {}  # prompt_id -> Task, for the tasks of this server that are on it now
        self.trackers = {}  # prompt_id -> ProgressTracker
        self.previews = {}  # prompt_id -> the newest sampler preview waiting to be pushed (servers/previews.py)
        self.ws_images = {}  # prompt_id -> [(node_id, content_type, bytes)] from SaveImageWebsocket
        self.sending = set()  # prompt_ids whose POST /prompt is in flight
        self.finishing = set()  # prompt_ids being finished: other terminal signals are no-ops
        self.cancel_sent = set()
        self.strangers = set()  # prompt_ids that are not ours: skip the database for their messages
        self.own = set()  # sent under this connection's clientId: their messages come to this socket
        self.adopted = set()  # on the server under another holder's clientId: followed by polling
        self.running = None  # the prompt the server runs now, as far as the socket said
        self.heard_start = {}  # prompt_id -> monotonic time the socket brought a message of its run
        self.heard_end = {}  # prompt_id -> monotonic time the socket brought its end

    def busy(self, prompt_id):
        """Being sent or finished right now: every other path leaves it alone."""
        return prompt_id in self.sending or prompt_id in self.finishing

    def stranger(self, prompt_id):
        if len(self.strangers) > STRANGERS_LIMIT:
            self.strangers.clear()
        self.strangers.add(prompt_id)

    def heard(self, prompt_id, ended):
        """The socket brought a message about the prompt: its end, or something of its run."""
        seen = self.heard_end if ended else self.heard_start
        if len(seen) > HEARD_LIMIT:
            seen.clear()
        seen[prompt_id] = time.monotonic()

    def close(self):
        """Stop every pending push and write (the connection stops)."""
        for pending in [*self.trackers.values(), *self.previews.values()]:
            pending.close()

    def forget(self, prompt_id):
        self.own.discard(prompt_id)
        self.adopted.discard(prompt_id)
        self.tasks.pop(prompt_id, None)
        tracker = self.trackers.pop(prompt_id, None)
        if tracker is not None:
            tracker.close()  # its pending push and write go with it
        self.ws_images.pop(prompt_id, None)
        preview = self.previews.pop(prompt_id, None)
        if preview is not None:
            preview.close()
        self.cancel_sent.discard(prompt_id)
        if self.running == prompt_id:
            self.running = None
