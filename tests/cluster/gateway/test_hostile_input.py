"""Hostile and malformed input against a real `dsv4 serve` over a socket: every bad request
gets INVALID_ARGUMENT (or RESOURCE_EXHAUSTED) naming what is wrong, before anything is
admitted; nothing a client sent comes back unbounded; a multi-MB prompt neither blocks
the server's event loop nor leaves its memory behind; TLS with `gateway.tls`."""

from __future__ import annotations

import datetime
import ipaddress
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2

from protos import load as load_protos
from tests.cluster.gateway.test_server import ENV, Server, assert_serving, chat, tiny_manifest, wait_idle

pb, pb_grpc = load_protos()
LIMIT = 8 * 1024 * 1024  # the served manifest's gateway.max_request_bytes
READABLE = 1100  # characters of status message a stock client reads without trouble (its metadata limit is 16 KB)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    manifest = tiny_manifest(tiny_checkpoint, tmp_path_factory.mktemp("manifest") / "m.yaml",
                             f"max_request_bytes: {LIMIT}")  # fmt: skip
    s = Server("-m", manifest)
    yield s
    assert s.stop() == 0


def status_of(call) -> tuple[grpc.StatusCode, str]:
    try:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) // 1024


METHODS = [m.name for m in pb.DESCRIPTOR.services_by_name["Inference"].methods]


@pytest.mark.parametrize("method", METHODS)
def test_an_undecodable_body_is_invalid_argument_on_every_method(server, method):
    raw = server.channel.unary_unary(f"/dsv4.v1.Inference/{method}")  # bytes in, bytes out
    code, details = status_of(lambda: raw(b"\xff\xff\xff\xff\x0f", timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid dsv4.v1." in details, (code, details)
    assert_serving(server)


def _with_bad_utf8(message) -> bytes:
    """`message` serialized with its placeholder text 'PLACEHOLDER' replaced by a lone surrogate."""
    return message.SerializeToString().replace(b"PLACEHOLDER", b"\xed\xa0\x80PLACEHOLDE")


@pytest.mark.parametrize(("method", "message"), [
    ("Chat", pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="PLACEHOLDER")])),
    ("Encode", pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="PLACEHOLDER")])),
    ("Generate", pb.GenerateRequest(text="PLACEHOLDER")),
    ("Abort", pb.AbortRequest(request_id="PLACEHOLDER")),
])  # fmt: skip
def test_invalid_utf8_is_invalid_argument(server, method, message):
    call = (server.channel.unary_stream if method in ("Chat", "Generate") else server.channel.unary_unary)(
        f"/dsv4.v1.Inference/{method}"
    )
    code, details = status_of(lambda: call(_with_bad_utf8(message), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in details, (code, details)


@pytest.mark.parametrize("request_id", ["café", "line\nbreak", "nul\0byte", "x" * 20000])
def test_a_request_id_a_header_cannot_carry_is_refused_before_admission(server, request_id):
    before = server.stub.GetServerInfo(pb.GetServerInfoRequest()).totals.prompt_tokens
    for call in (
        lambda: server.stub.Chat(pb.ChatRequest(request_id=request_id, messages=chat().messages), timeout=10),
        lambda: server.stub.Generate(pb.GenerateRequest(request_id=request_id, token_ids=[5, 6, 7]), timeout=10),
    ):
        code, details = status_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("request_id:"), (code, details)
        assert len(details) < READABLE
    assert server.stub.GetServerInfo(pb.GetServerInfoRequest()).totals.prompt_tokens == before  # nothing admitted


def test_a_good_request_id_comes_back_in_the_header(server):
    request = chat(max_tokens=2)
    request.request_id = "my-id_1.2 ~ok"
    responses = server.stub.Chat(request, timeout=60)
    assert dict(responses.initial_metadata())["x-request-id"] == "my-id_1.2 ~ok"
    assert list(responses)[-1].finish.request_id == "my-id_1.2 ~ok"


MEGA = "z" * 1_000_000


@pytest.mark.parametrize(("name", "call", "field"), [
    ("role", lambda s: s.Encode(pb.ChatRequest(messages=[pb.ChatMessage(role=MEGA, content="Hello")])),
     "messages[0].role"),
    ("thinking_mode", lambda s: s.Encode(pb.ChatRequest(thinking_mode=MEGA, messages=chat().messages)),
     "thinking_mode"),
    ("reasoning_effort", lambda s: s.Encode(pb.ChatRequest(reasoning_effort=MEGA, messages=chat().messages)),
     "reasoning_effort"),
    ("abort id", lambda s: s.Abort(pb.AbortRequest(request_id=MEGA)), "request_id"),
])  # fmt: skip
def test_error_messages_quote_a_short_prefix_of_client_input(server, name, call, field):
    code, details = status_of(lambda: call(server.stub))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field), (name, code, details[:200])
    assert len(details) < READABLE and "1000000 characters" in details


def test_errors_name_the_field_that_is_wrong(server):
    code, details = status_of(lambda: server.stub.Generate(pb.GenerateRequest(text="hello " * 400), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("text: the prompt is"), details
    nested = "[" * 10000 + "]" * 10000
    tool = pb.Tool(name="deep", parameters=nested)
    code, details = status_of(lambda: server.stub.Encode(pb.ChatRequest(messages=chat().messages, tools=[tool])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "tools[0].parameters: is nested too deeply" in details


def test_a_body_over_the_limit_is_resource_exhausted(server):
    big = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="a" * (LIMIT + 10))])
    code, details = status_of(lambda: server.stub.Encode(big, timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details[:200])
    assert_serving(server)


def _big_text(n_bytes: int, seed: int) -> str:
    words = "the quick brown fox jumps over a lazy dog 12345 ünïcödé 漢字 — ok".split()
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_bytes:
        word = rng.choice(words)
        out.append(word)
        size += len(word.encode()) + 1
    return " ".join(out)


def test_a_multi_mb_prompt_blocks_neither_health_nor_small_requests(server):
    """Tokenizing runs off the event loop: while a 6 MB Chat is tokenized (it is then refused,
    too long for the context), Health and a small Encode keep answering. Before, such a
    Chat held every other call for as long as it tokenized (4.3 s for 3 MB in the issue,
    0.6 s for 2 MB here; under 0.05 s now)."""
    big = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content=_big_text(6_000_000, 0))])
    worst = {"health": 0.0, "encode": 0.0}
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            t0 = time.monotonic()
            server.health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            t1 = time.monotonic()
            server.stub.Encode(chat("Hi"), timeout=10)
            t2 = time.monotonic()
            worst["health"], worst["encode"] = max(worst["health"], t1 - t0), max(worst["encode"], t2 - t1)
            time.sleep(0.01)

    thread = threading.Thread(target=probe)
    thread.start()
    try:
        for _ in range(2):
            code, details = status_of(lambda: server.stub.Chat(big, timeout=60))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("messages: the prompt is")
    finally:
        done.set()
        thread.join()
    # 10x what it takes here, for a loaded 2-core machine; the blocking loop took over a second
    assert worst["health"] < 0.5 and worst["encode"] < 0.5, worst


def test_memory_returns_after_multi_mb_prompts(server):
    """48 requests of 0.3-3 MB, 8 at a time (Encode, Chat and Generate, each refused or
    answered): a few seconds after, the server's RSS is within 200 MB of where it started.
    (Before: +450 MB and staying, refused requests kept alive by grpc.aio's abort.)"""
    start = rss_mb(server.proc.pid)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.max_receive_message_length", 64 << 20)])
    stub = pb_grpc.InferenceStub(channel)

    def one(i: int) -> None:
        text = _big_text(random.Random(i).randint(300_000, 3_000_000), 10 + i)
        message = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content=text)])
        status_of([lambda: stub.Encode(message, timeout=60), lambda: stub.Chat(message, timeout=60),
                   lambda: stub.Generate(pb.GenerateRequest(text=text), timeout=60)][i % 3])  # fmt: skip

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(48)))
    channel.close()
    deadline = time.monotonic() + 15
    while rss_mb(server.proc.pid) - start >= 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert rss_mb(server.proc.pid) - start < 200, (start, rss_mb(server.proc.pid))
    assert wait_idle(server.stub).kv_pages_used == 0
    assert_serving(server)


# -- TLS -----------------------------------------------------------------------------------
def _self_signed(tmp_path) -> tuple[bytes, str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    return cert_pem, str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")


def test_gateway_tls_serves_with_grpcs_own_credentials(tiny_checkpoint, tmp_path):
    cert_pem, cert, key = _self_signed(tmp_path)
    manifest = tiny_manifest(tiny_checkpoint, tmp_path / "m.yaml", f"tls: {{cert: {cert}, key: {key}}}")
    s = Server("-m", manifest)
    try:
        secure = grpc.secure_channel(f"127.0.0.1:{s.port}", grpc.ssl_channel_credentials(cert_pem))
        responses = list(pb_grpc.InferenceStub(secure).Chat(chat(max_tokens=2), timeout=60))
        assert responses[-1].finish.finish_reason == "length"
        secure.close()
        code, _ = status_of(lambda: s.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5))  # plaintext
        assert code == grpc.StatusCode.UNAVAILABLE
        cli = [sys.executable, "-m", "cluster.cli", "chat", "--target", f"127.0.0.1:{s.port}", "--max-tokens", "2"]
        done = subprocess.run([*cli, "--tls-ca", cert, "Hello"], capture_output=True, text=True, timeout=120, env=ENV)
        assert done.returncode == 0, done.stderr
        plain = subprocess.run([*cli, "Hello"], capture_output=True, text=True, timeout=120, env=ENV)
        assert plain.returncode != 0 and "cannot reach" in plain.stderr
    finally:
        assert s.stop() == 0


def test_unreadable_tls_files_stop_the_server_with_a_clear_error(tiny_checkpoint, tmp_path):
    (tmp_path / "cert.pem").write_text("not a certificate")
    tls = f"tls: {{cert: {tmp_path / 'cert.pem'}, key: {tmp_path / 'no.pem'}}}"
    with pytest.raises(AssertionError, match=r"gateway\.tls\.(cert|key)"):
        Server("-m", tiny_manifest(tiny_checkpoint, tmp_path / "m.yaml", tls))


# -- the fuzz test -------------------------------------------------------------------------
class Hostile:
    """A seeded generator of malformed and hostile requests over every RPC: random and
    mutated raw bodies, absurd sampling values, hostile strings, out-of-range ids."""

    STRINGS = ["", "café", "\0", "a\nb", "\u202e", "\U0001f600" * 50, "<｜User｜>", "</think>", "{", "[" * 3000,
               "x" * 70_000, "<｜DSML｜tool_calls>", "\ud7ff", " " * 500]  # fmt: skip

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def text(self) -> str:
        r = self.rng.random()
        if r < 0.004:  # a multi-MB prompt now and then
            return _big_text(self.rng.randint(1_000_000, 3_000_000), self.rng.randrange(100))
        return self.rng.choice(self.STRINGS) if r < 0.6 else _big_text(self.rng.randint(1, 4000), 0)

    def sampling(self) -> pb.SamplingParams:
        r, p = self.rng, pb.SamplingParams()
        for name, values in [("max_tokens", [-5, 0, 1, 3, 2**31 - 1]), ("temperature", [-1.0, 0.0, 0.7, 1e9,
                             float("nan"), float("inf")]), ("top_p", [-0.5, 0.0, 0.5, 1.0, 2.0, float("nan")]),
                             ("top_k", [-3, 0, 5, 10**9]), ("min_p", [-1.0, 0.0, 0.5, 1.0, 7.0]),
                             ("seed", [-(2**63), 0, 2**63 - 1]), ("logprobs", [-1, 0, 3, 20, 21, 10**6])]:  # fmt: skip
            if r.random() < 0.3:
                setattr(p, name, r.choice(values))
        if r.random() < 0.2:
            p.stop.extend(self.text() for _ in range(r.randint(1, 40)))
        if r.random() < 0.2:
            p.stop_token_ids.extend(r.choice([-1, 0, 1, 129279, 2**62]) for _ in range(r.randint(1, 5)))
        p.ignore_eos = r.random() < 0.1
        if p.HasField("max_tokens") and p.max_tokens > 4:
            p.max_tokens = 4  # keep the accepted ones short
        elif not p.HasField("max_tokens"):
            p.max_tokens = 2
        return p

    def chat(self) -> pb.ChatRequest:
        r = self.rng
        roles = ["user", "assistant", "system", "tool", "developer", "latest_reminder", "robot", ""]
        messages = []
        for _ in range(r.randint(0, 4)):
            m = pb.ChatMessage(role=r.choice(roles), content=self.text())
            if r.random() < 0.2:
                m.reasoning_content = self.text()
            if r.random() < 0.2:
                arguments = r.choice(['{"a": 1}', "[1]", "nope", "", "{" * 5000])
                m.tool_calls.append(pb.ToolCall(id=self.text(), name=r.choice(["f", ""]), arguments=arguments))
            if r.random() < 0.1:
                m.tool_call_id = self.text()
            messages.append(m)
        tools = [pb.Tool(name=r.choice(["f", ""]), description=self.text(),
                         parameters=r.choice(["", '{"type": "object"}', "[]", "x", "[" * 10000]))
                 for _ in range(r.choice([0, 0, 1, 2]))]  # fmt: skip
        return pb.ChatRequest(request_id=r.choice(["", "", "ok-1", self.text()]), messages=messages, tools=tools,
                              thinking_mode=r.choice(["", "chat", "thinking", self.text()]),
                              reasoning_effort=r.choice(["", "high", "max", "low", self.text()]),
                              sampling=self.sampling())  # fmt: skip

    def generate(self) -> pb.GenerateRequest:
        r = self.rng
        ids = [r.choice([-1, 0, 5, 1000, 129279, 129280, 2**62]) for _ in range(r.choice([0, 1, 5, 300]))]
        return pb.GenerateRequest(request_id=r.choice(["", "g", self.text()]), token_ids=ids,
                                  text=self.text() if r.random() < 0.4 else "", sampling=self.sampling())  # fmt: skip

    def body(self, message) -> bytes:
        """`message` serialized, then maybe mutated: bit flips, truncation, random bytes."""
        data, r = bytearray(message.SerializeToString()), self.rng
        kind = r.random()
        if kind < 0.15:
            return bytes(r.getrandbits(8) for _ in range(r.randint(0, 64)))
        if kind < 0.3 and data:
            for _ in range(r.randint(1, 4)):
                data[r.randrange(len(data))] ^= 1 << r.randrange(8)
        elif kind < 0.4 and data:
            del data[r.randrange(len(data)) :]
        return bytes(data)

    def call(self) -> tuple[str, bytes]:
        # (not Drain: a valid one would drain the server; its undecodable body is tested above)
        method = self.rng.choice([m for m in METHODS if m != "Drain"] + ["Chat", "Chat", "Generate", "Generate"])
        message = {"Chat": self.chat, "Encode": self.chat, "Generate": self.generate}.get(method)
        if message is not None:
            return method, self.body(message())
        if method == "Abort":
            return method, self.body(pb.AbortRequest(request_id=self.text()))
        return method, self.body(pb.GetModelInfoRequest())


def test_fuzz_every_rpc_gets_a_precise_status(server):
    """2,000 generated calls (seed 16, a few with multi-MB prompts): none ends UNKNOWN or
    INTERNAL, none hangs; after, the server is SERVING and idle, and its RSS is within
    200 MB of where it started."""
    fuzz, bad, codes = Hostile(16), [], {}
    streaming = {"Chat", "Generate"}
    start = rss_mb(server.proc.pid)
    for i in range(2000):
        method, body = fuzz.call()
        make = server.channel.unary_stream if method in streaming else server.channel.unary_unary
        call = make(f"/dsv4.v1.Inference/{method}")
        code, details = status_of(lambda c=call, b=body: c(b, timeout=60))
        codes[code.name] = codes.get(code.name, 0) + 1
        if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED):
            bad.append((i, method, code.name, details[:200]))
        assert len(details) < READABLE, (i, method, details[:200])
    assert not bad, bad
    assert codes.get("OK", 0) >= 200 and codes.get("INVALID_ARGUMENT", 0) >= 500, codes  # both kinds were exercised
    assert wait_idle(server.stub, timeout=30).kv_pages_used == 0
    assert_serving(server)
    deadline = time.monotonic() + 15
    while rss_mb(server.proc.pid) - start >= 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert rss_mb(server.proc.pid) - start < 200, (start, rss_mb(server.proc.pid))
