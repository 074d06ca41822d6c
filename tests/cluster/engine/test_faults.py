"""The fault-injection harness (workers/faults.py) at each of its points, through the real
gateway (a grpc.aio server in this process, a real client over a socket) over real
in-process engines: prefill and decode instances with a KV handoff. For each point: no
hang, no KV page left in use on any instance, the precise status to the client, and the
server serving after. (A Ray actor killed mid-step or mid-export: tests/cluster/backends.)"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from cluster.engine.pool_router import DisaggRouter
from cluster.gateway.core import Gateway, ServingInfo
from cluster.gateway.server import start_server
from protos import load as load_protos
from tests.cluster.engine.test_disagg import engine, model_of
from workers import faults
from workers.worker import ModelWorker

pb, pb_grpc = load_protos()
PROMPT = [0, 100, 2000, 30000, 400, 17, 9]


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    """A prefill and a decode instance behind a DisaggRouter (policy recompute) and a gateway."""
    pre, dec = model_of(tiny_checkpoint), model_of(tiny_checkpoint)
    prefill, decode = engine(ModelWorker(pre), pre.cfg), engine(ModelWorker(dec), dec.cfg)
    router = DisaggRouter([prefill], [decode], on_failure="recompute")
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    gateway = Gateway(router, ServingInfo(pre.cfg, str(tiny_checkpoint), "float32", "inprocess", 4))
    running = asyncio.run_coroutine_threadsafe(start_server(gateway, "127.0.0.1", 0), loop).result(30)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    stub = pb_grpc.InferenceStub(channel)
    reference = generate(stub)  # before any fault
    assert reference[1] == grpc.StatusCode.OK and len(reference[0]) == 6
    yield stub, router, reference[0]
    faults.disarm()
    channel.close()
    asyncio.run_coroutine_threadsafe(running.server.stop(0), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    router.stop()


def generate(stub, timeout: float = 60) -> tuple[list[int], grpc.StatusCode, str, object]:
    """Greedy tokens, the status, its details, and the Finish (None if none came)."""
    request = pb.GenerateRequest(token_ids=PROMPT, sampling=pb.SamplingParams(max_tokens=6, temperature=0.0,
                                                                               ignore_eos=True))  # fmt: skip
    tokens, finish = [], None
    try:
        for response in stub.Generate(request, timeout=timeout):
            if response.WhichOneof("kind") == "chunk":
                tokens += response.chunk.token_ids
            else:
                finish = response.finish
    except grpc.RpcError as e:
        return tokens, e.code(), e.details() or "", finish
    return tokens, grpc.StatusCode.OK, "", finish


def clean_and_serving(stub, router, reference) -> None:
    """No page in use on any instance, nothing armed left, and a request answered as before."""
    assert router.wait_idle(timeout=30)
    assert all(e.load()["kv_pages_used"] == 0 and e.kv.used_pages == 0 and e.worker.num_states() == 0
               for e in router.engines)  # fmt: skip
    tokens, code, details, _ = generate(stub)
    assert code == grpc.StatusCode.OK and tokens == reference, (code, details)


def test_a_raise_in_the_prefill_step_fails_that_request_with_its_reason(served):
    stub, router, reference = served
    faults.arm("worker.prefill", "raise")
    tokens, code, _, finish = generate(stub)
    assert code == grpc.StatusCode.OK and tokens == [] and finish.finish_reason == "error"
    assert "InjectedFault" in finish.error and "worker.prefill" in finish.error, finish.error
    clean_and_serving(stub, router, reference)


def test_a_decode_step_stalled_past_the_deadline_ends_deadline_exceeded(served):
    stub, router, reference = served
    faults.arm("worker.decode", "stall", seconds=3.0)
    t0 = time.monotonic()
    _, code, _, _ = generate(stub, timeout=1.0)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 2.5  # no hang on the stall
    time.sleep(2.5)  # the stalled step ends; the aborted request's pages go back
    clean_and_serving(stub, router, reference)


@pytest.mark.parametrize("point", ["worker.export", "worker.import"])
def test_a_handoff_that_fails_is_recomputed_with_the_same_tokens(served, point):
    stub, router, reference = served
    recomputed = router.recomputed
    faults.arm(point, "raise")
    tokens, code, _, finish = generate(stub)
    assert code == grpc.StatusCode.OK and tokens == reference and finish.finish_reason == "length"
    assert router.recomputed == recomputed + 1
    clean_and_serving(stub, router, reference)


def test_a_failing_stream_write_ends_internal_and_aborts_the_request(served):
    stub, router, reference = served
    faults.arm("gateway.stream", "raise")
    tokens, code, details, _ = generate(stub)
    assert code == grpc.StatusCode.INTERNAL and "the response stream failed" in details, (code, details)
    clean_and_serving(stub, router, reference)


def test_a_failing_placement_ends_internal_and_admits_nothing(served):
    stub, router, reference = served
    before = [e.stats.tokens_in for e in router.engines]
    faults.arm("router.place", "raise")
    tokens, code, details, _ = generate(stub)
    assert code == grpc.StatusCode.INTERNAL and "placing the request failed" in details, (code, details)
    assert [e.stats.tokens_in for e in router.engines] == before
    clean_and_serving(stub, router, reference)


def test_unknown_points_and_actions_are_refused():
    with pytest.raises(ValueError, match="unknown fault point"):
        faults.arm("worker.sneeze", "raise")
    with pytest.raises(ValueError, match="unknown fault action"):
        faults.arm("worker.decode", "explode")
