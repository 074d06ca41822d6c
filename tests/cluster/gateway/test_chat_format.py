"""The chat-format streaming checked through the real gateway (a grpc.aio server and a
real client) over a scripted engine that replays given completion text."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import grpc
import pytest

from cluster.engine.requests import EngineUnavailableError, QueueFullError, RequestOutput
from cluster.gateway.core import Gateway, ServingInfo
from cluster.gateway.server import start_server
from encoding import EOS_ID, VOCAB_SIZE, load_tokenizer
from encoding import tokens as T
from encoding.dsml import render_tool_calls
from protos import load as load_protos
from tests.cluster.gateway.test_server import chat
from workers.presets import preset_config

pb, pb_grpc = load_protos()


class ScriptedEngine:
    """Replays `script` (completion text, how it ends) for every request, 3 characters per token."""

    def __init__(self) -> None:
        self.tokenizer = load_tokenizer()
        self.vocab_size, self.eos_id = VOCAB_SIZE, EOS_ID
        self.config = SimpleNamespace(max_model_len=4096)
        self.script: tuple[str, str] = ("", "eos")
        self.refuse: Exception | None = None
        self.aborted: list[str] = []

    def submit(self, request, sink) -> None:
        if self.refuse is not None:
            raise self.refuse
        threading.Thread(target=self._replay, args=(request, sink, *self.script), daemon=True).start()

    def _replay(self, request, sink, text: str, end: str) -> None:
        usage = {"prompt_tokens": len(request.prompt_ids), "time_to_first_token_ms": 1.0}
        pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
        for n, piece in enumerate(pieces, start=1):
            if request.uid in self.aborted:
                return sink(RequestOutput(request.uid, finish_reason="abort", completion_tokens=n, **usage))
            sink(RequestOutput(request.uid, (42,), piece, completion_tokens=n, **usage))
            time.sleep(0.002)
        n = len(pieces)
        if end == "eos":
            sink(RequestOutput(request.uid, (EOS_ID,), "", completion_tokens=n + 1, **usage))
        reason = {"eos": "stop", "length": "length", "error": "error", "lost": "error"}[end]
        error = {"error": "worker died", "lost": "unavailable: a worker of the instance was lost"}.get(end)
        sink(RequestOutput(request.uid, finish_reason=reason, error=error, unavailable=end == "lost", **usage))

    def abort(self, uid: str) -> bool:
        self.aborted.append(uid)
        return True

    def load(self) -> dict[str, int]:
        return {"running": 0, "waiting": 0, "kv_pages_used": 0, "kv_pages_free": 1, "kv_pages_total": 1}


def _serve_scripted(strict: bool):
    engine = ScriptedEngine()
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    info = ServingInfo(preset_config("tiny"), "scripted", "bfloat16", "scripted", 64)
    engine.gateway = Gateway(engine, info, strict_output_format=strict)
    running = asyncio.run_coroutine_threadsafe(start_server(engine.gateway, "127.0.0.1", 0), loop).result(30)
    engine.port = running.port
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield engine, pb_grpc.InferenceStub(channel)
    channel.close()
    asyncio.run_coroutine_threadsafe(running.server.stop(0), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)


@pytest.fixture(scope="module")
def scripted():
    """The gateway as served by default: output that breaks the chat format goes on as content."""
    yield from _serve_scripted(strict=False)


@pytest.fixture(scope="module")
def strict():
    """A gateway with `gateway.strict_output_format: true`."""
    yield from _serve_scripted(strict=True)


def format_errors(scripted) -> float:
    return scripted[0].gateway.metrics.registry.get_sample_value("dsv4_output_format_errors_total")


def run_script(scripted, text: str, end: str = "eos", thinking: bool = False) -> SimpleNamespace:
    engine, stub = scripted
    engine.script, engine.refuse = (text, end), None
    responses = list(stub.Chat(chat(thinking=thinking), timeout=30))
    kinds = [r.WhichOneof("kind") for r in responses]
    assert kinds.count("finish") == 1 and kinds[-1] == "finish"
    deltas = [r.delta for r in responses if r.WhichOneof("kind") == "delta"]
    return SimpleNamespace(
        order="".join("r" if d.reasoning_content else "c" for d in deltas if d.reasoning_content or d.content),
        reasoning="".join(d.reasoning_content for d in deltas),
        content="".join(d.content for d in deltas),
        calls=[r.tool_call for r in responses if r.WhichOneof("kind") == "tool_call"],
        finish=responses[-1].finish,
    )


WEATHER_CALLS = render_tool_calls(
    [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}},
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
    ]
)


def test_thinking_streams_reasoning_then_content(scripted):
    out = run_script(scripted, "The user greets me. I greet back.</think>Hello there!", thinking=True)
    assert out.reasoning == "The user greets me. I greet back." and out.content == "Hello there!"
    assert re.fullmatch(r"r+c+", out.order) and out.finish.finish_reason == "stop" and not out.finish.error


def test_tool_calls_come_back_parsed(scripted):
    out = run_script(scripted, "Let me check." + WEATHER_CALLS)
    assert out.content == "Let me check." and out.finish.finish_reason == "stop"
    assert [c.name for c in out.calls] == ["get_weather", "get_weather"] and len({c.id for c in out.calls}) == 2
    assert [json.loads(c.arguments) for c in out.calls] == [{"city": "Paris", "days": 3}, {"city": "Oslo"}]


def test_cut_short_output_keeps_text_and_sends_an_open_call_raw(scripted):
    out = run_script(scripted, "step one </thi", end="length", thinking=True)
    assert out.reasoning == "step one </thi" and out.finish.finish_reason == "length"
    cut = WEATHER_CALLS[:-40]  # cut inside the second call
    out = run_script(scripted, "Checking." + cut, end="length")
    assert [json.loads(c.arguments) for c in out.calls] == [{"city": "Paris", "days": 3}]
    first_call_end = cut.index(T.INVOKE_CLOSE) + len(T.INVOKE_CLOSE)
    assert out.content == "Checking." + cut[first_call_end:] and out.finish.finish_reason == "length"


def test_strict_cut_short_output_drops_an_open_call(strict):
    out = run_script(strict, "Checking." + WEATHER_CALLS[:-40], end="length")
    assert out.content == "Checking." and out.finish.finish_reason == "length"
    assert [json.loads(c.arguments) for c in out.calls] == [{"city": "Paris", "days": 3}]


@pytest.mark.parametrize(
    ("text", "thinking", "end"),
    [
        ("fine so far <think> then " + "more " * 200, True, "length"),  # a special token inside the reasoning
        ("Hello " + T.DSML + " and then some text", False, "eos"),  # inside the content
        ("Let me check." + WEATHER_CALLS.replace(" string=\"true\"", " string=yes", 1), False, "eos"),  # bad call
        ("done." + T.THINK_END + "more", False, "eos"),  # </think> in chat mode
    ],
    ids=["reasoning", "content", "tool-call", "think-end"],
)
def test_output_that_breaks_the_format_loses_nothing(scripted, text, thinking, end):
    """Every character the model wrote reaches the client (reasoning, then the rest as
    content from the break on); the finish reason is what ended the answer; it is counted."""
    engine, _ = scripted
    before = format_errors(scripted)
    out = run_script(scripted, text, end=end, thinking=thinking)
    assert out.reasoning + out.content == text and not out.calls
    assert out.finish.finish_reason == {"eos": "stop", "length": "length"}[end] and not out.finish.error
    assert out.finish.request_id not in engine.aborted
    assert format_errors(scripted) == before + 1


def test_eos_inside_the_reasoning_ends_cleanly(scripted):
    out = run_script(scripted, "never closed", thinking=True)
    assert out.reasoning == "never closed" and out.content == "" and out.finish.finish_reason == "stop"
    assert not out.finish.error


def test_strict_malformed_output_ends_with_error_and_aborts(strict):
    engine, _ = strict
    before = format_errors(strict)
    out = run_script(strict, "fine so far <think> then " + "more " * 200, end="length", thinking=True)
    assert out.finish.finish_reason == "error" and "breaks the chat format" in out.finish.error
    assert out.finish.request_id in engine.aborted
    out = run_script(strict, "never closed", thinking=True)  # EOS inside the reasoning
    assert out.finish.finish_reason == "error" and "inside the reasoning" in out.finish.error
    assert format_errors(strict) == before + 2


def test_engine_error_is_a_final_message(scripted):
    out = run_script(scripted, "partial", end="error")
    assert out.content == "partial" and out.finish.finish_reason == "error" and out.finish.error == "worker died"


@pytest.mark.parametrize(
    ("refusal", "code"),
    [
        (QueueFullError("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (EngineUnavailableError("down"), grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_engine_refusals_map_to_status_codes(scripted, refusal, code):
    engine, stub = scripted
    engine.refuse = refusal
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Chat(chat(), timeout=30))
    assert e.value.code() == code
    engine.refuse = None
    assert run_script(scripted, "ok").content == "ok"


def test_tool_history_reaches_the_prompt(scripted):
    _, stub = scripted
    messages = [
        pb.ChatMessage(role="system", content="Be brief."),
        pb.ChatMessage(role="user", content="Weather in Paris?"),
        pb.ChatMessage(
            role="assistant", tool_calls=[pb.ToolCall(id="c1", name="get_weather", arguments='{"city": "Paris"}')]
        ),
        pb.ChatMessage(role="tool", tool_call_id="c1", content="sunny"),
    ]
    prompt = stub.Encode(pb.ChatRequest(messages=messages, tools=[pb.Tool(name="get_weather")])).prompt
    assert prompt.index("Be brief.") < prompt.index("## Tools") < prompt.index('"name": "get_weather"')
    assert '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>' in prompt
    assert "<tool_result>sunny</tool_result>" in prompt


def test_lost_workers_end_the_stream_with_unavailable(scripted):
    engine, stub = scripted
    engine.script, engine.refuse = ("partial answer", "lost"), None
    call = stub.Chat(chat(), timeout=30)
    received = []
    with pytest.raises(grpc.RpcError) as e:
        for response in call:
            received.append(response)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "lost" in e.value.details()
    assert received[-1].finish.finish_reason == "error"  # the final message came first
    assert "".join(r.delta.content for r in received if r.WhichOneof("kind") == "delta") == "partial answer"


@pytest.mark.parametrize(("script", "code"), [(("Fine, thanks.", "eos"), 0), (("partial", "error"), 2)])
def test_dsv4_chat_exits_non_zero_when_the_answer_ends_in_an_error(scripted, script, code):
    engine, _ = scripted
    engine.script, engine.refuse = script, None
    cmd = [sys.executable, "-m", "cluster.cli", "chat", "--target", f"127.0.0.1:{engine.port}", "Hi"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == code, done.stderr
    assert done.stdout.strip() == script[0]
    assert ("the answer ended in an error: worker died" in done.stderr) == (code != 0)
