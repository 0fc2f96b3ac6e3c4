"""
Fault isolation in the supervisor, and no false alarms about the upstream socket.
"""

import asyncio

import httpx
import pytest

from servers.comfy import ComfyClient, ComfyRejected

# --- the client ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "graph",
    [{"1": {"inputs": {"text": "\ud800"}}}, {"1": {"inputs": {"x": float("nan")}}}, {"1": {"inputs": {"x": object()}}}],
    ids=["lone-surrogate", "nan", "not-json"],
)
def test_a_request_that_cannot_be_encoded_is_a_permanent_rejection_never_sent(graph):
    sent = []

    async def attempt():
        transport = httpx.MockTransport(lambda request: sent.append(request) or httpx.Response(200, json={}))
        async with ComfyClient("http://gpu.invalid:8188", transport=transport) as client:
            with pytest.raises(ComfyRejected) as caught:
                await client.submit(graph, "p-1", "c-1")
        return caught.value

    error = asyncio.run(attempt())
    assert sent == []
    assert error.permanent and not error.sent
    assert error.message.startswith("the request could not be encoded: ")
    error.message.encode("utf-8")  # storable and showable as it is
