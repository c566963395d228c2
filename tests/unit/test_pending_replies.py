"""The gateway's waiting requests: replays are dropped, a dead fleet ends them at once."""

from __future__ import annotations

import asyncio

import grpc

from llmesh.common.fleet import FleetView
from llmesh.common.status import error_status
from llmesh.v1 import events_pb2
from services.gateway.replies import PendingReplies


async def _collect(pending: PendingReplies, request_id: str) -> list[events_pb2.TextChunk]:
    deadline = asyncio.get_running_loop().time() + 5
    return [chunk async for chunk in pending.chunks(request_id, deadline)]


async def test_a_replayed_chunk_is_delivered_once():
    pending = PendingReplies()
    pending.open("r1")
    first = events_pb2.TextChunk(request_id="r1", text="Hello", seq=1)
    assert pending.deliver(first)
    assert not pending.deliver(first), "the same chunk again (a replay) is dropped"
    assert pending.deliver(events_pb2.TextChunk(request_id="r1", text=" world", seq=2))
    assert not pending.deliver(first), "an older chunk is dropped too"
    assert pending.deliver(events_pb2.TextChunk(request_id="r1", final=True, seq=3))
    assert [c.text for c in await _collect(pending, "r1")] == ["Hello", " world", ""]


async def test_a_chunk_for_no_waiting_request_is_dropped():
    assert not PendingReplies().deliver(events_pb2.TextChunk(request_id="nobody", final=True, seq=1))


async def test_fail_all_ends_every_waiting_request_with_the_error():
    pending = PendingReplies()
    for request_id in ("a", "b"):
        pending.open(request_id)
    pending.deliver(events_pb2.TextChunk(request_id="a", text="partial", seq=1))
    error = error_status(grpc.StatusCode.UNAVAILABLE, "no infer replica is alive")
    assert pending.fail_all(error) == 2
    a, b = await _collect(pending, "a"), await _collect(pending, "b")
    assert [c.text for c in a] == ["partial", ""] and a[-1].error.message == "no infer replica is alive"
    assert b[-1].final and b[-1].error.code == grpc.StatusCode.UNAVAILABLE.value[0]


def test_the_fleet_view_names_what_is_down():
    view = FleetView({"infer-2": {("chat", 1)}}, ["infer-1"])
    assert view.can_serve("chat", 1) and not view.can_serve("chat", 2)
    assert "none of the 1 live infer replicas has chat@2 loaded" in view.why_not("chat", 2)
    dead = FleetView({}, ["infer-1"])
    assert not dead.can_serve("chat", 1)
    assert dead.why_not("chat", 1) == "no infer replica is alive (infer-1 stopped beating); retry shortly"
