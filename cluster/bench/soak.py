"""`dsv4 bench soak`: hours of mixed, hostile load on a real `dsv4 serve`, checked for what
must not drift: canary answers, KV pages, memory, latency.

It starts `dsv4 serve` (a preset or a manifest; float32 by default, where greedy tokens do
not depend on what else is in the batch) or soaks a running one (`--target`), and runs
`--concurrency` clients for `--minutes`. Each client loops over a seeded mix: Generate and
Chat with random prompt and output lengths, streams it cancels after a few messages,
requests it aborts by id from the side, requests with deadlines too short to finish, a few
malformed ones, and canaries: fixed greedy prompts whose tokens must equal what the server
answered for them alone, before the load. At the end it reports canary mismatches, KV
pages in use once idle (a leak if not 0), the server's RSS drift (when it started the
server), and TTFT / inter-token latency in the first and the last tenth of the run.
Exit status 1 when a canary mismatched, a page leaked, or a call ended UNKNOWN/INTERNAL.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from cluster.bench import BenchError
from cluster.bench.serve import percentile
from protos import load as load_protos

pb, pb_grpc = load_protos()

CANARIES = [
    [0, 100, 2000, 30000, 400],
    list(range(1000, 1040)),
    [7, 7, 7, 7, 7, 7, 7, 7, 90000, 3],
]  # fmt: skip
CANARY_TOKENS = 12
BROKEN = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


@dataclass
class Tally:
    """What the clients saw, shared between them (under `lock`)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: dict[str, int] = field(default_factory=dict)  # kind -> count
    codes: dict[str, int] = field(default_factory=dict)  # status name -> count
    broken: list[str] = field(default_factory=list)  # UNKNOWN / INTERNAL details
    canaries: int = 0
    mismatches: list[str] = field(default_factory=list)
    ttft: list[tuple[float, float]] = field(default_factory=list)  # (time into the run, ms)
    itl: list[tuple[float, float]] = field(default_factory=list)

    def count(self, kind: str, code: grpc.StatusCode) -> None:
        with self.lock:
            self.calls[kind] = self.calls.get(kind, 0) + 1
            self.codes[code.name] = self.codes.get(code.name, 0) + 1


class Client:
    """One soaking client: a loop of seeded random calls until `stop_at`."""

    def __init__(self, stub, tally: Tally, reference: dict[int, list[int]], seed: int, t0: float,
                 max_prompt: int, max_tokens: int) -> None:  # fmt: skip
        self.stub, self.tally, self.reference, self.t0 = stub, tally, reference, t0
        self.rng, self.seed = random.Random(seed), seed
        self.max_prompt, self.max_tokens = max_prompt, max_tokens
        self.n = 0

    def run(self, stop_at: float) -> None:
        while time.monotonic() < stop_at:
            self.n += 1
            kind = self.rng.choices(["generate", "chat", "cancel", "abort", "deadline", "malformed", "canary"],
                                    weights=[30, 20, 10, 8, 8, 4, 20])[0]  # fmt: skip
            code = getattr(self, kind)()
            self.tally.count(kind, code)
            if code in BROKEN:
                with self.tally.lock:
                    self.tally.broken.append(f"{kind}: {code.name}")

    # -- the kinds of call ---------------------------------------------------------------
    def _sampling(self) -> pb.SamplingParams:
        r = self.rng
        return pb.SamplingParams(max_tokens=r.randint(1, self.max_tokens), temperature=r.choice([0.0, 0.8]),
                                 seed=r.getrandbits(31), ignore_eos=r.random() < 0.5)  # fmt: skip

    def _ids(self) -> list[int]:
        return [self.rng.randint(3, 120000) for _ in range(self.rng.randint(1, self.max_prompt))]

    def _stream(self, call, timeout: float = 300, cancel_after: int | None = None) -> grpc.StatusCode:
        """Consume a stream, timing its tokens; cancel after `cancel_after` messages."""
        start, last, n = time.monotonic(), None, 0
        try:
            for response in call(timeout):
                n += 1
                now = time.monotonic()
                if _has_tokens(response):
                    with self.tally.lock:
                        if last is None:
                            self.tally.ttft.append((start - self.t0, (now - start) * 1000))
                        else:
                            self.tally.itl.append((now - self.t0, (now - last) * 1000))
                    last = now
                if cancel_after is not None and n >= cancel_after:
                    return grpc.StatusCode.CANCELLED
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    def generate(self) -> grpc.StatusCode:
        request = pb.GenerateRequest(token_ids=self._ids(), sampling=self._sampling())
        return self._stream(lambda t: self.stub.Generate(request, timeout=t))

    def chat(self) -> grpc.StatusCode:
        words = " ".join(self.rng.choice(["hello", "world", "tell", "me", "about", "ünï", "漢字", "42"])
                         for _ in range(self.rng.randint(1, self.max_prompt // 2)))  # fmt: skip
        request = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content=words)], sampling=self._sampling(),
                                 thinking_mode=self.rng.choice(["chat", "thinking"]))  # fmt: skip
        return self._stream(lambda t: self.stub.Chat(request, timeout=t))

    def cancel(self) -> grpc.StatusCode:
        request = pb.GenerateRequest(token_ids=self._ids(), sampling=pb.SamplingParams(max_tokens=self.max_tokens))
        return self._stream(lambda t: self.stub.Generate(request, timeout=t), cancel_after=self.rng.randint(1, 3))

    def abort(self) -> grpc.StatusCode:
        uid = f"soak-{self.seed}-{self.n}"
        sampling = pb.SamplingParams(max_tokens=self.max_tokens, ignore_eos=True)
        request = pb.GenerateRequest(request_id=uid, token_ids=self._ids(), sampling=sampling)
        delay = self.rng.uniform(0.0, 0.3)

        def abort_later() -> None:
            time.sleep(delay)
            try:
                self.stub.Abort(pb.AbortRequest(request_id=uid), timeout=30)
            except grpc.RpcError:  # finished (or not started) before: INVALID_ARGUMENT
                pass

        aborter = threading.Thread(target=abort_later, daemon=True)
        aborter.start()
        code = self._stream(lambda t: self.stub.Generate(request, timeout=t))
        aborter.join()
        return code

    def deadline(self) -> grpc.StatusCode:
        sampling = pb.SamplingParams(max_tokens=self.max_tokens, ignore_eos=True)
        request = pb.GenerateRequest(token_ids=self._ids(), sampling=sampling)
        return self._stream(lambda t: self.stub.Generate(request, timeout=self.rng.uniform(0.01, 0.5)))

    def malformed(self) -> grpc.StatusCode:
        bad = self.rng.choice([
            pb.GenerateRequest(token_ids=[-1]),
            pb.GenerateRequest(request_id="café", token_ids=[5]),
            pb.ChatRequest(messages=[pb.ChatMessage(role="robot", content="x")]),
            pb.GenerateRequest(token_ids=[5], sampling=pb.SamplingParams(top_p=7.0)),
        ])  # fmt: skip
        method = self.stub.Chat if isinstance(bad, pb.ChatRequest) else self.stub.Generate
        return self._stream(lambda t: method(bad, timeout=t))

    def canary(self) -> grpc.StatusCode:
        i = self.rng.randrange(len(CANARIES))
        tokens: list[int] = []
        try:
            for response in self.stub.Generate(canary_request(i), timeout=300):
                if response.WhichOneof("kind") == "chunk":
                    tokens += response.chunk.token_ids
        except grpc.RpcError as e:
            return e.code()
        with self.tally.lock:
            self.tally.canaries += 1
            if tokens != self.reference[i]:
                self.tally.mismatches.append(f"canary {i}: {tokens} != {self.reference[i]}")
        return grpc.StatusCode.OK


def _has_tokens(response) -> bool:
    kind = response.WhichOneof("kind")
    if kind == "chunk":
        return bool(response.chunk.token_ids)
    return kind == "delta" and bool(response.delta.content or response.delta.reasoning_content)


def canary_request(i: int) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(max_tokens=CANARY_TOKENS, temperature=0.0, ignore_eos=True)
    return pb.GenerateRequest(token_ids=CANARIES[i], sampling=sampling)


def reference_tokens(stub) -> dict[int, list[int]]:
    """Each canary's greedy tokens, asked alone before the load starts."""
    out = {}
    for i in range(len(CANARIES)):
        out[i] = [t for r in stub.Generate(canary_request(i), timeout=300) if r.WhichOneof("kind") == "chunk"
                  for t in r.chunk.token_ids]  # fmt: skip
    return out


# -- the server ------------------------------------------------------------------------------
class Served:
    """`dsv4 serve` started for the soak (its log in a temporary file)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", prefix="dsv4-soak-", suffix=".log", delete=False)  # noqa: SIM115
        if args.manifest:
            model = ["-m", args.manifest]
        else:
            manifest = Path(self.log.name).with_suffix(".yaml")
            manifest.write_text(f"model: {{preset: {args.preset}, dtype: {args.dtype}}}\n"
                                f"scheduler: {{max_model_len: 4096, kv_cache_gib: 0.125, max_running: 64}}\n"
                                "gateway: {port: 0, metrics_port: null}\n")  # fmt: skip
            model = ["-m", str(manifest)]
        cmd = [sys.executable, "-m", "cluster.cli", "serve", "--port", "0", *model]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, env=os.environ.copy())
        self.port = self._wait_port()

    def _wait_port(self, timeout: float = 600) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = Path(self.log.name).read_text()
            if m := re.search(r"listening on [\d.]+:(\d+)", text):
                return int(m.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError(f"dsv4 serve exited ({self.proc.returncode}):\n{text[-3000:]}")
            time.sleep(0.2)
        raise RuntimeError("dsv4 serve did not start listening")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(f.read().split("VmRSS:")[1].split()[0]) / 1024

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def _idle_load(stub, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        load = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).load
        if (load.running == load.waiting == load.kv_pages_used == 0) or time.monotonic() > deadline:
            return load
        time.sleep(0.1)


def _tenths(samples: list[tuple[float, float]], span: float) -> tuple[float, float]:
    """p50 of the samples in the first and in the last tenth of the run."""
    first = [v for t, v in samples if t <= span / 10]
    last = [v for t, v in samples if t >= span * 9 / 10]
    return percentile(first, 50), percentile(last, 50)


def _check_args(args: argparse.Namespace) -> None:
    for name, low in (("minutes", 0.0), ("concurrency", 1), ("max_prompt", 1), ("max_tokens", 1), ("settle_s", 0.0)):
        value = getattr(args, name)
        if value < low or (name == "minutes" and value <= 0):
            raise BenchError(f"--{name.replace('_', '-')} must be {'> 0' if name == 'minutes' else f'>= {low}'}, "
                             f"got {value}")  # fmt: skip


def bench_soak_main(args: argparse.Namespace) -> int:
    _check_args(args)
    served = None if args.target else Served(args)
    target = args.target or f"127.0.0.1:{served.port}"
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
    stub = pb_grpc.InferenceStub(channel)
    try:
        try:
            reference = reference_tokens(stub)
        except grpc.RpcError as e:
            raise BenchError(f"the gateway at {target} cannot answer the canaries: {e.code().name}: "
                             f"{e.details()}") from None  # fmt: skip
        start_load = _idle_load(stub)
        rss_start = served.rss_mb() if served else None
        tally, t0 = Tally(), time.monotonic()
        stop_at = t0 + args.minutes * 60
        clients = [Client(stub, tally, reference, args.seed * 1000 + i, t0, args.max_prompt, args.max_tokens)
                   for i in range(args.concurrency)]  # fmt: skip
        threads = [threading.Thread(target=c.run, args=(stop_at,), daemon=True) for c in clients]
        for t in threads:
            t.start()
        rss = _progress(threads, stop_at, tally, served, t0)
        span = time.monotonic() - t0
        end_load = _idle_load(stub)
        time.sleep(args.settle_s)  # the gateway hands freed memory back within seconds
        rss_end = served.rss_mb() if served else None
    finally:
        channel.close()
        code = served.stop() if served else 0
    report = {
        "minutes": args.minutes, "concurrency": args.concurrency, "calls": sum(tally.calls.values()),
        "by_kind": tally.calls, "codes": tally.codes, "broken": tally.broken[:20], "canaries": tally.canaries,
        "canary_mismatches": len(tally.mismatches), "mismatch_examples": tally.mismatches[:3],
        "pages_free_start": start_load.kv_pages_free + start_load.kv_pages_cached,
        "pages_free_end": end_load.kv_pages_free + end_load.kv_pages_cached,
        "pages_used_end": end_load.kv_pages_used, "rss_start_mb": rss_start, "rss_end_mb": rss_end,
        "rss_first_tenth_mb": max((v for t, v in rss if t <= span / 10), default=None),
        "rss_max_mb": max((v for _, v in rss), default=None),
        "ttft_p50_ms": _tenths(tally.ttft, span), "itl_p50_ms": _tenths(tally.itl, span), "server_exit": code,
    }  # fmt: skip
    _print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    ok = not tally.mismatches and not tally.broken and end_load.kv_pages_used == 0 and code == 0
    return 0 if ok else 1


def _progress(threads: list[threading.Thread], stop_at: float, tally: Tally, served: Served | None,
              t0: float) -> list[tuple[float, float]]:  # fmt: skip
    """Wait for the clients with a progress bar; the server's RSS each second."""
    from tqdm import tqdm

    total, rss = max(1, int(stop_at - time.monotonic())), []
    with tqdm(total=total, desc="soak", unit="s", file=sys.stderr) as bar:
        while any(t.is_alive() for t in threads):
            time.sleep(1.0)
            if served is not None:
                rss.append((time.monotonic() - t0, served.rss_mb()))
            bar.n = min(total, total - max(0, int(stop_at - time.monotonic())))
            bar.set_postfix(calls=sum(tally.calls.values()), canaries=tally.canaries,
                            mismatches=len(tally.mismatches), refresh=False)  # fmt: skip
            bar.refresh()
    return rss


def _print(r: dict) -> None:
    if r["rss_start_mb"] is None:
        rss = "n/a (--target)"
    else:
        rss = (f"{r['rss_start_mb']:.0f} MB at the start, {r['rss_first_tenth_mb']:.0f} after the first tenth "
               f"(warm: KV pages first touched, batch shapes first seen), {r['rss_max_mb']:.0f} at most, "
               f"{r['rss_end_mb']:.0f} at the end ({r['rss_end_mb'] - r['rss_first_tenth_mb']:+.0f} MB "
               "since the first tenth)")  # fmt: skip
    print(f"\ndsv4 bench soak: {r['minutes']:g} min at concurrency {r['concurrency']}: {r['calls']} calls")
    print("  by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(r["by_kind"].items())))
    print("  statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(r["codes"].items())))
    print(f"  canaries: {r['canaries']} checked, {r['canary_mismatches']} mismatched")
    print(f"  KV pages free: {r['pages_free_start']} at the start, {r['pages_free_end']} at the end "
          f"({r['pages_used_end']} still in use)")  # fmt: skip
    print(f"  server RSS: {rss}")
    (t1, t2), (i1, i2) = r["ttft_p50_ms"], r["itl_p50_ms"]
    print(f"  TTFT p50: {t1:.0f} ms (first tenth) -> {t2:.0f} ms (last tenth); "
          f"ITL p50: {i1:.1f} -> {i2:.1f} ms")  # fmt: skip
    if r["broken"]:
        print(f"  UNKNOWN/INTERNAL: {r['broken']}")
