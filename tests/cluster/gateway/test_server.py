"""The gRPC gateway end to end: `dsv4 serve` in a subprocess driven by a real gRPC client
(the chat format over a scripted engine: test_chat_format.py)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from encoding import VOCAB_SIZE, encode_messages, load_tokenizer
from protos import load as load_protos
from workers.presets import preset_config
from workers.score import score
from workers.weights import load_model

pb, pb_grpc = load_protos()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # see tests/conftest.py
MAX_LEN = 256  # the served manifest's max_model_len


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`dsv4 serve` in a subprocess; its log is collected by a thread."""

    def __init__(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "cluster.cli", "serve", "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()
        self.port = int(self.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None and not any(re.search(pattern, ln) for ln in self.lines):
                raise AssertionError(f"server exited ({self.proc.returncode}):\n{''.join(self.lines)}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in the server log:\n{''.join(self.lines)}")

    def stop(self) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def tiny_manifest(checkpoint, path, gateway: str = "") -> str:
    """A manifest serving `checkpoint` with MAX_LEN of context; `gateway`: more gateway keys."""
    path.write_text(
        f"model: {{checkpoint: {checkpoint}}}\n"
        f"scheduler: {{max_model_len: {MAX_LEN}, kv_cache_gib: 0.25}}\n"
        f"gateway: {{port: 50051, metrics_port: null{', ' + gateway if gateway else ''}}}\n"
    )
    return str(path)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    manifest = tiny_manifest(tiny_checkpoint, tmp_path_factory.mktemp("manifest") / "m.yaml")
    s = Server("-m", manifest, "--metrics-port", str(free_port()))
    yield s
    assert s.stop() == 0


def chat(text: str = "Hello", thinking: bool = False, **sampling) -> pb.ChatRequest:
    messages = [pb.ChatMessage(role="user", content=text)]
    mode = "thinking" if thinking else "chat"
    return pb.ChatRequest(messages=messages, thinking_mode=mode, sampling=pb.SamplingParams(**sampling))


def generate(ids=(0, 100, 2000, 30000, 400), **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=list(ids), sampling=pb.SamplingParams(**sampling))


def wait_idle(stub, timeout: float = 5.0) -> pb.Load:
    deadline = time.monotonic() + timeout
    while True:
        load = stub.GetServerInfo(pb.GetServerInfoRequest()).load
        if load.running == load.waiting == load.kv_pages_used == 0 or time.monotonic() > deadline:
            return load
        time.sleep(0.05)


def assert_serving(s: Server) -> None:
    status = s.health.Check(health_pb2.HealthCheckRequest(service="dsv4.v1.Inference")).status
    assert status == health_pb2.HealthCheckResponse.SERVING


# -- the real server ---------------------------------------------------------------------------
def test_32_concurrent_chats_complete(server):
    def one(i: int) -> list:
        return list(server.stub.Chat(chat(f"Hello number {i}", max_tokens=4, seed=i), timeout=120))

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    for responses in results:
        finish = responses[-1].finish
        assert responses[-1].WhichOneof("kind") == "finish" and finish.finish_reason in ("length", "stop")
        assert 1 <= finish.usage.completion_tokens <= 4 and finish.usage.prompt_tokens > 0
        assert all(r.WhichOneof("kind") != "finish" for r in responses[:-1])
    assert wait_idle(server.stub).running == 0


def test_greedy_generate_matches_the_model(server, tiny_checkpoint):
    prompt = [0, 100, 2000, 30000, 400, 5, 77777]
    responses = list(server.stub.Generate(generate(prompt, max_tokens=8, temperature=0, ignore_eos=True)))
    chunks = [r.chunk for r in responses if r.WhichOneof("kind") == "chunk"]
    got = [t for c in chunks for t in c.token_ids]
    model = load_model(tiny_checkpoint, dtype=torch.bfloat16, progress=False)
    seq = list(prompt)
    for _ in range(8):  # the greedy chain, recomputed from scratch for every token
        seq.append(int(score(model, [torch.tensor(seq)], None)[0][-1].float().argmax()))
    assert got == seq[len(prompt) :]
    assert "".join(c.text for c in chunks) == load_tokenizer(str(tiny_checkpoint)).decode(got)
    assert responses[-1].finish.finish_reason == "length" and responses[-1].finish.usage.completion_tokens == 8


def test_generate_text_prompt_and_logprobs(server):
    request = pb.GenerateRequest(text="The sky is", sampling=pb.SamplingParams(max_tokens=3, temperature=0, logprobs=2))
    chunks = [r.chunk for r in server.stub.Generate(request) if r.WhichOneof("kind") == "chunk"]
    for c in chunks:
        (lp,) = c.logprobs
        assert lp.token_id == c.token_ids[0] and len(lp.top) == 2
        assert lp.top[0].token_id == lp.token_id and lp.top[0].logprob >= lp.top[1].logprob  # greedy


def test_cancel_mid_stream_frees_pages(server):
    call = server.stub.Generate(generate(max_tokens=200, ignore_eos=True))
    stream = iter(call)
    next(stream), next(stream)
    load = server.stub.GetServerInfo(pb.GetServerInfoRequest()).load
    assert load.running == 1 and load.kv_pages_used > 0
    call.cancel()
    load = wait_idle(server.stub)
    assert (load.running, load.waiting, load.kv_pages_used) == (0, 0, 0)
    assert load.kv_pages_free + load.kv_pages_cached == load.kv_pages_total > 0


def test_deadline_aborts_the_request(server):
    with pytest.raises(grpc.RpcError) as e:
        list(server.stub.Generate(generate(max_tokens=200, ignore_eos=True), timeout=1.5))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_idle(server.stub).kv_pages_used == 0


def test_abort_by_request_id(server):
    request = generate(max_tokens=200, ignore_eos=True)
    request.request_id = "abort-me"
    call = server.stub.Generate(request)
    stream = iter(call)
    next(stream)
    assert ("x-request-id", "abort-me") in call.initial_metadata()
    server.stub.Abort(pb.AbortRequest(request_id="abort-me"))
    last = list(stream)[-1]
    assert last.finish.finish_reason == "abort" and last.finish.request_id == "abort-me"
    assert last.finish.usage.completion_tokens < 200
    assert wait_idle(server.stub).kv_pages_used == 0


def _tool_call(arguments: str) -> pb.ChatMessage:
    return pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(id="c1", name="f", arguments=arguments)])


BAD_INPUTS = {
    "no messages": ("Chat", pb.ChatRequest(), "messages"),
    "unknown role": ("Chat", pb.ChatRequest(messages=[pb.ChatMessage(role="robot")]), "messages[0].role"),
    "tool schema not JSON": (
        "Chat",
        pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="hi")], tools=[pb.Tool(name="f", parameters="{")]),
        "tools[0].parameters",
    ),
    "tool call arguments not JSON": (
        "Chat",
        pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="hi"), _tool_call("{oops")]),
        "messages[1].tool_calls[0].arguments",
    ),
    "prompt over the context": ("Chat", chat("hello " * 300), "messages: the prompt is"),
    "prompt + max_tokens over the context": ("Chat", chat(max_tokens=MAX_LEN), "sampling.max_tokens"),
    "max_tokens < 1": ("Chat", chat(max_tokens=0), "sampling.max_tokens"),
    "temperature < 0": ("Chat", chat(temperature=-1), "sampling.temperature"),
    "bad thinking mode": (
        "Chat",
        pb.ChatRequest(messages=[pb.ChatMessage(role="user")], thinking_mode="x"),
        "thinking_mode",
    ),
    "unknown request id": ("Abort", pb.AbortRequest(request_id="nope"), "request_id"),
    "token id out of vocabulary": ("Generate", generate([0, VOCAB_SIZE]), "token_ids[1]"),
    "negative token id": ("Generate", generate([-1]), "token_ids[0]"),
    "empty generate": ("Generate", pb.GenerateRequest(), "token_ids"),
    "encode with no messages": ("Encode", pb.ChatRequest(), "messages"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_invalid_argument_and_server_keeps_serving(server, case):
    method, request, field = BAD_INPUTS[case]
    with pytest.raises(grpc.RpcError) as e:
        result = getattr(server.stub, method)(request, timeout=30)
        if method in ("Chat", "Generate"):
            list(result)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert field in e.value.details()
    assert_serving(server)


def test_chat_thinking_mode_streams_reasoning(server):
    request = chat("Why is the sky blue?", thinking=True, max_tokens=6, temperature=0)
    prompt_ids = server.stub.Encode(request).token_ids
    responses = list(server.stub.Chat(request))
    finish = responses[-1].finish
    assert finish.usage.prompt_tokens == len(prompt_ids) and finish.time_to_first_token_ms > 0
    deltas = [r.delta for r in responses if r.WhichOneof("kind") == "delta"]
    assert deltas and deltas[0].reasoning_content and not deltas[0].content  # the prompt ends inside <think>


def test_a_growing_conversation_reuses_its_prefix(server):
    """Turn 2 repeats turn 1's long user message: the server reports the cached tokens (the
    page-aligned part of what turn 1 computed that turn 2's prompt shares)."""
    long_text = " ".join(f"item {i} is {i * i}" for i in range(26))  # ~150 tokens (the server allows 256)
    first = chat(long_text, max_tokens=4, temperature=0)
    responses = list(server.stub.Chat(first))
    answer = "".join(r.delta.content for r in responses if r.WhichOneof("kind") == "delta")
    assert responses[-1].finish.usage.cached_tokens == 0
    second = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content=long_text),
                                      pb.ChatMessage(role="assistant", content=answer),
                                      pb.ChatMessage(role="user", content="And item 7?")],
                            sampling=pb.SamplingParams(max_tokens=4, temperature=0))  # fmt: skip
    ids1, ids2 = server.stub.Encode(first).token_ids, server.stub.Encode(second).token_ids
    shared = next((i for i, (a, b) in enumerate(zip(ids1, ids2, strict=False)) if a != b), min(len(ids1), len(ids2)))
    finish = list(server.stub.Chat(second))[-1].finish
    # turn 1 kept its state at its prompt's last page boundary and at its latest one
    kept = {len(ids1) // 128 * 128, (len(ids1) + 4 - 1) // 128 * 128}
    expected = max((b for b in kept if b <= min(shared, len(ids2) - 1)), default=0)
    assert expected >= 128 and finish.usage.cached_tokens == expected
    load = wait_idle(server.stub)
    assert load.prefix_hits >= 1 and load.kv_pages_cached > 0


def test_chat_logprobs_cover_every_token(server):
    responses = list(server.stub.Chat(chat(max_tokens=3, temperature=0, logprobs=1)))
    logprobs = [lp for r in responses if r.WhichOneof("kind") == "delta" for lp in r.delta.logprobs]
    assert len(logprobs) == responses[-1].finish.usage.completion_tokens == 3
    assert all(len(lp.top) == 1 and lp.top[0].token_id == lp.token_id for lp in logprobs)


def test_encode_matches_the_encoder(server, tiny_checkpoint):
    tool = pb.Tool(name="get_weather", description="Weather", parameters='{"type": "object"}')
    request = pb.ChatRequest(
        messages=[pb.ChatMessage(role="user", content="Hi")], tools=[tool], thinking_mode="thinking"
    )
    got = server.stub.Encode(request)
    function = {"name": "get_weather", "description": "Weather", "parameters": {"type": "object"}}
    messages = [{"role": "system", "content": "", "tools": [{"type": "function", "function": function}]},
                {"role": "user", "content": "Hi"}]  # fmt: skip
    expected = encode_messages(messages, "thinking")
    assert got.prompt == expected and "## Tools" in got.prompt
    assert list(got.token_ids) == load_tokenizer(str(tiny_checkpoint)).encode(expected)


def test_model_and_server_info(server, tiny_checkpoint):
    assert server.port != 50051  # --port 0 overrides the manifest's port
    info = server.stub.GetModelInfo(pb.GetModelInfoRequest())
    cfg = preset_config("tiny")
    assert (info.num_layers, info.hidden_size, info.num_routed_experts) == (4, cfg.hidden_size, cfg.n_routed_experts)
    assert info.max_context == MAX_LEN and info.vocab_size == VOCAB_SIZE and info.checkpoint == str(tiny_checkpoint)
    assert info.architecture == "DeepseekV4ForCausalLM" and info.tokenizer_path.endswith("tokenizer.json")
    from workers.layers import default_cpu_dtype  # the manifest says dtype auto: report what runs

    assert info.dtype == str(default_cpu_dtype()).removeprefix("torch.")
    srv = server.stub.GetServerInfo(pb.GetServerInfoRequest())
    assert srv.backend == "inprocess" and not srv.draining and len(srv.pools) == 1
    assert srv.load.kv_pages_total > 0 and srv.load.page_size == 128
    list(server.stub.Generate(generate(max_tokens=2)))  # so that every layer has routed tokens
    balance = server.stub.GetServerInfo(pb.GetServerInfoRequest()).expert_balance
    assert [b.layer for b in balance] == list(range(info.num_layers))
    assert all(0 < b.balancedness <= 1 and b.tokens > 0 for b in balance)
    workers = server.stub.GetServerInfo(pb.GetServerInfoRequest()).pools[0].workers
    assert [(w.instance, w.rank, w.node) for w in workers] == [(0, 0, "local")]


def test_reflection_lists_the_services(server):
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    (answer,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in answer.list_services_response.service}
    assert {"dsv4.v1.Inference", "grpc.health.v1.Health"} <= names


def test_metrics_endpoint(server):
    list(server.stub.Generate(generate(max_tokens=2)))
    port = int(server.wait_for(r"metrics on http://127\.0\.0\.1:(\d+)").group(1))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for name in ("dsv4_queue_length", "dsv4_running_requests", "dsv4_kv_pages_used", "dsv4_kv_pages_free",
                 "dsv4_time_to_first_token_seconds_count", "dsv4_inter_token_latency_seconds_count",
                 "dsv4_prompt_tokens_total", "dsv4_generation_tokens_total"):  # fmt: skip
        assert re.search(rf"^{name} ", text, re.M), name
    assert float(re.search(r'^dsv4_requests_total\{finish_reason="length"\} (\S+)', text, re.M).group(1)) >= 1


def test_cli_chat_remote_and_unreachable(server):
    cmd = [sys.executable, "-m", "cluster.cli", "chat", "Hi", "--max-tokens", "3", "--seed", "1"]
    proc = subprocess.run([*cmd, "--target", f"127.0.0.1:{server.port}"], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "[finish: length; usage: prompt 5, completion 3" in proc.stderr and proc.stdout
    proc = subprocess.run([*cmd, "--target", f"127.0.0.1:{free_port()}"], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 2 and "cannot reach a dsv4 gateway" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_chat_local_with_the_default_model(tmp_path):
    cmd = [sys.executable, "-m", "cluster.cli", "chat", "--local", "Hello", "--max-tokens", "4", "--seed", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, "DSV4_CACHE": str(tmp_path)}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "models" / "tiny-seed0" / "config.json").is_file()
    assert proc.stdout.strip() and "usage: prompt 5, completion 4" in proc.stderr


def test_sigterm_drains_and_exits_zero(tiny_checkpoint):
    s = Server("--checkpoint", str(tiny_checkpoint))
    call = s.stub.Generate(generate(max_tokens=24, ignore_eos=True))
    stream = iter(call)
    next(stream)
    s.proc.send_signal(signal.SIGTERM)
    s.wait_for("draining")
    assert s.health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as e:
        list(s.stub.Generate(generate(max_tokens=2)))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    last = list(stream)[-1]  # the running request is finished, not cut
    assert last.finish.finish_reason == "length" and last.finish.usage.completion_tokens == 24
    assert s.proc.wait(timeout=60) == 0
