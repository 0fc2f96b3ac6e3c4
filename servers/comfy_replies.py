"""
What a ComfyUI server answers, as the client (servers/comfy.py) hands it on: its errors, each telling whether trying
again can help, and the shapes its /queue, /history and /prompt replies are parsed into.
"""

from dataclasses import dataclass, field
from typing import Any


class ComfyError(Exception):
    permanent = False

    def __init__(self, message, *, status=None, payload=None, sent=True):
        super().__init__(message)
        self.message = message
        self.status = status
        self.payload = payload
        # False only when the request certainly never reached the server (connection refused).
        self.sent = sent


class ComfyUnavailable(ComfyError):
    """The server could not be reached or did not answer sensibly: worth retrying."""

    permanent = False


class ComfyRejected(ComfyError):
    """The server refused the request: retrying the same request gives the same answer."""

    permanent = True

    @property
    def error(self):
        error = (self.payload or {}).get("error") or {}
        return error if isinstance(error, dict) else {"message": str(error)}

    @property
    def node_errors(self):
        return (self.payload or {}).get("node_errors") or {}


def speaks_jobs_api(version):
    """Whether a ComfyUI of this version has /api/jobs with its atomic cancel (0.26 and later); unknown: no."""
    try:
        parts = tuple(int(part) for part in str(version).lstrip("v").split(".")[:2])
    except ValueError:
        return False
    return len(parts) == 2 and parts >= (0, 26)


# --- replies --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueSnapshot:
    running: list[str]
    pending: list[str]
    # prompt_id -> the client_id it was submitted with (from each item's extra_data), when known
    clients: dict = field(default_factory=dict)

    def foreign(self, client_id):
        """How many queued or running prompts were submitted by other clients than `client_id` (or its ".x" ids)."""
        return sum(1 for pid in [*self.running, *self.pending] if not self.ours(pid, client_id))

    def ours(self, prompt_id, client_id):
        found = self.clients.get(prompt_id) or ""
        return found == client_id or found.startswith(f"{client_id}.")

    def where(self, prompt_id):
        if prompt_id in self.running:
            return "running"
        if prompt_id in self.pending:
            return "pending"
        return None

    def __len__(self):
        return len(self.running) + len(self.pending)


@dataclass(frozen=True)
class OutputFile:
    node_id: str
    filename: str
    subfolder: str
    type: str


@dataclass(frozen=True)
class HistoryEntry:
    prompt_id: str
    status_str: str
    completed: bool
    messages: list
    outputs: dict

    @classmethod
    def parse(cls, prompt_id, raw):
        if not isinstance(raw, dict):
            raise ComfyUnavailable(f"history entry for {prompt_id} is not an object")
        status = raw.get("status") or {}
        messages = [m for m in status.get("messages") or [] if isinstance(m, list | tuple) and len(m) == 2]
        return cls(
            prompt_id=prompt_id,
            status_str=str(status.get("status_str") or ""),
            completed=bool(status.get("completed")),
            messages=messages,
            outputs=raw.get("outputs") if isinstance(raw.get("outputs"), dict) else {},
        )

    def last(self, kind):
        for name, data in reversed(self.messages):
            if name == kind and isinstance(data, dict):
                return data
        return None

    @property
    def succeeded(self):
        return self.status_str == "success" or (self.completed and self.last("execution_error") is None)

    @property
    def interrupted(self):
        return self.last("execution_interrupted") is not None

    @property
    def error(self):
        return self.last("execution_error")

    def files(self):
        """Every file an output node produced, whatever the key ("images", "gifs", ...)."""
        found = []
        for node_id, output in self.outputs.items():
            if not isinstance(output, dict):
                continue
            for items in output.values():
                if not isinstance(items, list):
                    continue
                for item in items:
                    if isinstance(item, dict) and isinstance(item.get("filename"), str):
                        found.append(
                            OutputFile(
                                str(node_id),
                                item["filename"],
                                str(item.get("subfolder") or ""),
                                str(item.get("type") or "output"),
                            )
                        )
        return found


@dataclass(frozen=True)
class Submitted:
    prompt_id: str
    number: Any
    node_errors: dict
