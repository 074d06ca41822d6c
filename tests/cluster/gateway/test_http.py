"""The OpenAI-compatible HTTP API through the official `openai` client: against a live
`dsv4 serve --http-port 0` (oracles: the gRPC API of the same server, on the same engine
and encoding), and over a scripted engine for what a random model rarely writes (tool
calls, output that breaks the format) and for refusals."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from cluster.engine.requests import EngineUnavailableError, QueueFullError
from cluster.gateway.core import Gateway, ServingInfo
from cluster.gateway.http import start_http
from encoding import tokens as T
from protos import load as load_protos
from tests.cluster.gateway.test_chat_format import WEATHER_CALLS, ScriptedEngine
from tests.cluster.gateway.test_server import Server, chat, wait_idle
from workers.presets import preset_config

pb, pb_grpc = load_protos()
MAX_LEN = 1024  # the served manifest's max_model_len (a tool prompt is ~300 tokens)


@pytest.fixture(scope="module")
def live(tiny_checkpoint, tmp_path_factory):
    manifest = tmp_path_factory.mktemp("manifest") / "m.yaml"
    manifest.write_text(f"model: {{checkpoint: {tiny_checkpoint}, dtype: float32}}\n"
                        f"scheduler: {{max_model_len: {MAX_LEN}, kv_cache_gib: 0.25}}\n")  # fmt: skip
    s = Server("-m", str(manifest), "--http-port", "0")
    port = int(s.wait_for(r"HTTP API on http://127\.0\.0\.1:(\d+)").group(1))
    s.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    s.base = f"http://127.0.0.1:{port}"
    s.model = s.client.models.list().data[0].id
    yield s
    assert s.stop() == 0


def ask(live, text: str = "Hello", **kwargs):
    return live.client.chat.completions.create(model=live.model, messages=[{"role": "user", "content": text}],
                                               **kwargs)  # fmt: skip


def grpc_chat(live, text: str = "Hello", thinking: bool = False, **sampling):
    responses = list(live.stub.Chat(chat(text, thinking=thinking, **sampling), timeout=60))
    deltas = [r.delta for r in responses if r.WhichOneof("kind") == "delta"]
    return ("".join(d.reasoning_content for d in deltas), "".join(d.content for d in deltas), responses[-1].finish)


def test_models_health_and_metrics(live):
    model = live.client.models.list().data[0]
    assert model.id == live.model and model.dtype == "float32" and model.max_model_len == MAX_LEN
    assert httpx.get(f"{live.base}/health").json() == {"status": "ok"}
    assert "dsv4_output_format_errors_total" in httpx.get(f"{live.base}/metrics").text


def test_chat_completion_equals_the_grpc_answer(live):
    got = ask(live, max_tokens=12, temperature=0)
    _, content, finish = grpc_chat(live, max_tokens=12, temperature=0)
    assert got.choices[0].message.content == content and got.choices[0].finish_reason == finish.finish_reason
    assert got.usage.prompt_tokens == finish.usage.prompt_tokens and got.usage.completion_tokens == 12
    assert got.usage.prompt_tokens_details.cached_tokens == finish.usage.cached_tokens


def test_streaming_adds_up_to_the_whole_answer_with_usage(live):
    whole = ask(live, max_tokens=12, temperature=0).choices[0].message.content
    chunks = list(ask(live, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


@pytest.mark.parametrize("how", [{"thinking": {"type": "enabled"}}, {"chat_template_kwargs": {"thinking": True}}])
def test_thinking_on_streams_reasoning_content(live, how):
    reasoning, content, _ = grpc_chat(live, thinking=True, max_tokens=10, temperature=0)
    got = ask(live, max_tokens=10, temperature=0, extra_body=how).choices[0].message
    assert (getattr(got, "reasoning_content", None) or "") == reasoning and (got.content or "") == content
    assert reasoning  # a random model rarely closes </think> within 10 tokens: the reasoning is the answer
    off = ask(live, max_tokens=10, temperature=0, extra_body={"thinking": {"type": "disabled"}}).choices[0].message
    assert off.content == grpc_chat(live, max_tokens=10, temperature=0)[1]


def test_seed_determinism_and_n(live):
    a = ask(live, max_tokens=8, seed=11, temperature=1.0).choices[0].message.content
    b = ask(live, max_tokens=8, seed=11, temperature=1.0).choices[0].message.content
    assert a == b
    both = ask(live, max_tokens=8, seed=11, temperature=1.0, n=2)
    assert [c.index for c in both.choices] == [0, 1] and both.choices[0].message.content == a
    alone = ask(live, max_tokens=8, seed=12, temperature=1.0).choices[0].message.content
    assert both.choices[1].message.content == alone


def test_stop_and_logprobs(live):
    full = ask(live, max_tokens=16, temperature=0).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = ask(live, max_tokens=16, temperature=0, stop=[stop]).choices[0]
    assert cut.message.content == full[: full.index(stop)] and cut.finish_reason == "stop"
    lp = ask(live, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3).choices[0].logprobs.content
    assert len(lp) == 5 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in lp)
    assert all(t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in lp)  # greedy: the best is the chosen one


def test_reasoning_content_is_kept_on_tool_call_turns(live):
    """A tool loop sends back the assistant's reasoning (`reasoning_content` or `reasoning`);
    V4's encoding keeps it on tool-call turns: the prompt is the gRPC Encode of the same turns."""
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    for key in ("reasoning_content", "reasoning"):
        messages = [{"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": "", key: "I should look it up.", "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]  # fmt: skip
        got = live.client.chat.completions.create(model=live.model, messages=messages, tools=tools, max_tokens=1,
                                                  extra_body={"thinking": {"type": "enabled"}})  # fmt: skip
        pb_call = pb.ToolCall(id="c1", name="get_weather", arguments='{"city": "Paris"}')
        encoded = live.stub.Encode(pb.ChatRequest(
            messages=[pb.ChatMessage(role="user", content="Weather in Paris?"),
                      pb.ChatMessage(role="assistant", reasoning_content="I should look it up.", tool_calls=[pb_call]),
                      pb.ChatMessage(role="tool", tool_call_id="c1", content="sunny")],
            tools=[pb.Tool(name="get_weather", parameters='{"type": "object"}')], thinking_mode="thinking",
        ))  # fmt: skip
        assert "I should look it up." in encoded.prompt
        assert got.usage.prompt_tokens == len(encoded.token_ids)


@pytest.mark.parametrize(
    ("kwargs", "status", "param"),
    [
        ({"model": "gpt-4o"}, 404, "model"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
        ({"temperature": -1}, 400, "temperature"),
        ({"tool_choice": "required"}, 400, "tool_choice"),
        ({"reasoning_effort": "extreme"}, 400, "reasoning_effort"),
        ({"max_tokens": 10 * MAX_LEN}, 400, "max_tokens"),
        ({"messages": "not a list"}, 400, "messages"),
    ],
)
def test_bad_requests_get_openai_errors_naming_the_parameter(live, kwargs, status, param):
    args = {"model": live.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as e:
        live.client.chat.completions.create(**args)
    assert e.value.status_code == status
    assert e.value.body["param"] == param and e.value.body["type"].endswith("_error")
    assert ask(live, max_tokens=2).choices[0].finish_reason == "length"  # still serving


def test_completions_endpoint(live):
    got = live.client.completions.create(model=live.model, prompt="The weather", max_tokens=6, temperature=0,
                                         logprobs=2)  # fmt: skip
    want = list(live.stub.Generate(pb.GenerateRequest(text="The weather", sampling=pb.SamplingParams(
        max_tokens=6, temperature=0)), timeout=60))  # fmt: skip
    assert got.choices[0].text == "".join(r.chunk.text for r in want if r.WhichOneof("kind") == "chunk")
    assert len(got.choices[0].logprobs.tokens) == 6 and all(len(t) == 2 for t in got.choices[0].logprobs.top_logprobs)
    streamed = live.client.completions.create(model=live.model, prompt="The weather", max_tokens=6, temperature=0,
                                              stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == got.choices[0].text


def test_a_client_that_disconnects_frees_its_pages(live):
    with httpx.stream("POST", f"{live.base}/v1/chat/completions", timeout=60, json={
        "model": live.model, "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 200,
        "stream": True, "temperature": 1.0, "ignore_eos": True,
    }) as response:  # fmt: skip
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        next(lines)
    load = wait_idle(live.stub, timeout=10)
    assert load.running == 0 and load.kv_pages_used == 0


# -- over a scripted engine ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scripted_http():
    engine = ScriptedEngine()
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    engine.gateway = Gateway(engine, ServingInfo(preset_config("tiny"), "scripted", "bfloat16", name="scripted"))
    server, port = asyncio.run_coroutine_threadsafe(start_http(engine.gateway, "127.0.0.1", 0), loop).result(30)
    yield engine, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    server.should_exit = True
    time.sleep(0.3)
    loop.call_soon_threadsafe(loop.stop)


def scripted_ask(scripted_http, script: tuple[str, str], **kwargs):
    engine, client = scripted_http
    engine.script, engine.refuse = script, None
    return client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Weather?"}],
                                          **kwargs)  # fmt: skip


def test_tool_calls_come_back_parsed_over_http(scripted_http):
    got = scripted_ask(scripted_http, ("Let me check." + WEATHER_CALLS, "eos"))
    choice = got.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather"] * 2 and calls[0].type == "function"
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Paris", "days": 3}, {"city": "Oslo"}]
    chunks = list(scripted_ask(scripted_http, ("Let me check." + WEATHER_CALLS, "eos"), stream=True))
    pieces = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert len(pieces) > 4, "the arguments stream as the model writes them, not whole"
    firsts = [t for t in pieces if t.id]  # a call's first piece: its id, type and name
    assert [(t.index, t.type, t.function.name) for t in firsts] == [(i, "function", "get_weather") for i in (0, 1)]
    assert len({t.id for t in firsts}) == 2
    arguments = ["".join(t.function.arguments or "" for t in pieces if t.index == i) for i in (0, 1)]
    assert arguments == [c.function.arguments for c in calls]  # the same text as the whole calls
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_output_that_breaks_the_format_reaches_the_http_client(scripted_http):
    text = "Hello " + T.DSML + " and more"
    got = scripted_ask(scripted_http, (text, "eos"))
    assert got.choices[0].message.content == text and got.choices[0].finish_reason == "stop"


def test_a_body_over_the_limit_is_413_before_it_is_read(scripted_http):
    engine, client = scripted_http
    huge = "a" * (engine.gateway.limits.max_request_bytes + 1)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": huge}])
    assert e.value.status_code == 413 and "gateway.max_request_bytes" in e.value.body["message"]
    assert scripted_ask(scripted_http, ("fine", "eos")).choices[0].message.content == "fine"  # serving on


@pytest.mark.parametrize(("refusal", "status"), [(QueueFullError("full"), 429), (EngineUnavailableError("down"), 503)])
def test_refusals_map_to_http_statuses(scripted_http, refusal, status):
    engine, client = scripted_http
    engine.refuse = refusal
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == status
    engine.refuse = None
    engine.gateway.draining = True
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 503 and "draining" in e.value.body["message"]
    engine.gateway.draining = False
