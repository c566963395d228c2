"""Faults under load: every request ends with an answer or a fast, clear error, and the mesh heals."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import grpc
import pytest

from llmesh.loadgen import GatewayLoad, LoadRun
from llmesh.stack import processes, stack
from llmesh.stack.layout import SERVICES, StackLayout
from llmesh.v1 import gateway_pb2, infer_pb2, infer_pb2_grpc
from tests.e2e.restarts import wait_until_serving

pytestmark = pytest.mark.slow
TIMEOUT_S = 20.0


def outcomes(run: LoadRun) -> Counter[str]:
    return Counter(s.error.split(":")[0] if s.error else "OK" for s in run.samples)


def load(mesh: StackLayout) -> GatewayLoad:
    return GatewayLoad(mesh.address("gateway"), "chat", clients=2, timeout_s=TIMEOUT_S, interval_s=0.2)


def wait_until_answered(run: LoadRun, since: float, timeout: float = 120) -> float:
    """Seconds from `since` until a request that started after it succeeded."""
    deadline = time.monotonic() + timeout
    while not (answered := [s.finished for s in run.samples if s.started > since and not s.error]):
        assert time.monotonic() < deadline, f"no request succeeded within {timeout:.0f}s: {outcomes(run)}"
        time.sleep(0.2)
    return min(answered) - since


def assert_all_answered(mesh: StackLayout) -> None:
    """Afterwards every request succeeds."""
    with load(mesh) as after:
        time.sleep(3)
    assert after.run.samples, "no request finished"
    assert not after.run.errors, after.run.errors[:3]


def test_tritonserver_crash_infer_starts_it_again_and_reloads_what_it_serves(mesh):
    infer = processes.pid_of(mesh, "infer")
    assert infer is not None
    crashed = processes.child_named(infer, "tritonserver")
    assert crashed is not None, "infer runs its tritonserver"
    with load(mesh) as during:
        time.sleep(1)
        killed_at = time.monotonic()
        os.kill(crashed, signal.SIGKILL)
        back_s = wait_until_answered(during.run, since=killed_at)
    codes = outcomes(during.run)
    print(f"tritonserver kill -9: answered again after {back_s:.1f}s; outcomes {dict(codes)}")
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert codes["UNAVAILABLE"], "requests during the outage fail fast with UNAVAILABLE"
    assert max(s.latency_ms for s in during.run.samples) < TIMEOUT_S * 1000
    restarted = processes.child_named(infer, "tritonserver")
    assert restarted not in (None, crashed)
    assert_all_answered(mesh)
    with grpc.insecure_channel(mesh.address("infer")) as channel:
        loaded = infer_pb2_grpc.InferStub(channel).ListLoaded(infer_pb2.ListLoadedRequest(), timeout=10)
    assert any(v.model == "chat" for v in loaded.versions)


def test_redis_stop_and_restart_routing_survives_and_no_wrong_version_is_served(mesh, gateway):
    primary = gateway.GetModel(gateway_pb2.GetModelRequest(name="chat"), timeout=5).primary_version
    with load(mesh) as during:
        time.sleep(1)
        stopped_at = time.monotonic()
        assert processes.stop(mesh, "redis")
        time.sleep(3)
        stack.start_redis(mesh)
        back_s = wait_until_answered(during.run, since=stopped_at + 3)
    codes = outcomes(during.run)
    print(f"redis stop + start: answered again {back_s:.1f}s after the restart; outcomes {dict(codes)}")
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert codes["UNAVAILABLE"], "requests during the outage fail fast with UNAVAILABLE"
    assert max(s.latency_ms for s in during.run.errors) < 5000, "outage errors come fast"
    served = {v for s in during.run.samples for v in s.versions}
    assert served == {primary}, f"only the primary v{primary} answers, got {served}"
    assert gateway.GetModel(gateway_pb2.GetModelRequest(name="chat"), timeout=5).primary_version == primary
    assert_all_answered(mesh)


def test_kill_9_of_an_infer_replica_mid_load_its_requests_finish_on_the_other_or_fail_unavailable(mesh):
    stack.start_infer_replica(mesh, "infer-2")
    try:
        time.sleep(5)  # the group rebalances: the second replica takes half the partitions
        victim = processes.pid_of(mesh, "infer")
        assert victim is not None
        with GatewayLoad(mesh.address("gateway"), "chat", clients=6, max_tokens=48, timeout_s=TIMEOUT_S) as during:
            time.sleep(2)
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            time.sleep(12)  # the heartbeat lapses, the leases are taken over, the group rebalances
        codes = outcomes(during.run)
        hit = [s for s in during.run.samples if s.started < killed_at < s.finished]
        print(f"infer kill -9: {len(hit)} requests in flight at the kill; outcomes {dict(codes)}")
        assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
        assert hit, "requests were in flight when the replica died"
        assert max(s.latency_ms for s in during.run.samples) < TIMEOUT_S * 1000
        assert_all_answered(mesh)
    finally:
        processes.stop(mesh, "infer-2")
        wait_until_serving(mesh, "infer")  # the supervisor started it again


def test_broker_stop_and_restart_services_start_afresh_and_requests_fail_fast_meanwhile(mesh):
    pids = {name: processes.pid_of(mesh, name) for name in SERVICES}
    with load(mesh) as during:
        time.sleep(1)
        assert processes.stop(mesh, "broker")
        time.sleep(3)
        stack.start_broker(mesh)
        back_s = wait_until_answered(during.run, since=time.monotonic())
    codes = outcomes(during.run)
    print(f"broker stop + start (all topics lost): answered again {back_s:.1f}s after the restart; outcomes {dict(codes)}")
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert codes["UNAVAILABLE"], "requests during the outage fail fast with UNAVAILABLE"
    assert max(s.latency_ms for s in during.run.errors) < 6000, "outage errors come fast"
    assert {name: processes.pid_of(mesh, name) for name in SERVICES} == pids, "the services restarted in place"
    for name in SERVICES:
        wait_until_serving(mesh, name)
    assert_all_answered(mesh)
