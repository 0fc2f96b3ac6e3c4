import json
from pathlib import Path

import pytest

from tests.conftest import ApiClient

FAST_GRAPH = json.loads((Path(__file__).resolve().parents[2] / "workflows" / "fast.json").read_text())["graph"]


class V2Client(ApiClient):
    """The v2 surface as an integrator's code sees it: bearer token, JSON in and out, the contract's paths."""

    def submit(self, workflow=None, key=None, **body):
        headers = {"HTTP_IDEMPOTENCY_KEY": key} if key is not None else {}
        return self.post("/api/v2/jobs", {"workflow": FAST_GRAPH if workflow is None else workflow, **body}, **headers)


@pytest.fixture
def alice_v2(alice, raw_graph_permission):
    alice.user_permissions.add(raw_graph_permission)
    return V2Client(alice)


@pytest.fixture
def bob_v2(bob, raw_graph_permission):
    bob.user_permissions.add(raw_graph_permission)
    return V2Client(bob)
