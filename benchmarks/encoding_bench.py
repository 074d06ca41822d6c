"""Cost of the chat encoding at 1M-token scale: encode, tokenize, stream back.

Two conversations, each built at about 100K and about 1M tokens:

  document   one user turn holding a long document, then the generation prefix
  tools      a long agent session: system tools, then rounds of user question, assistant
             reasoning + two tool calls, two tool results (out of call order), answer

For each: seconds and tokens/s of ``encode_messages`` (messages -> prompt string) and of
``tokenizer.encode`` (prompt -> ids), then the 1M/100K time ratio next to the token
ratio: equal ratios mean cost grows linearly. The last rows stream a long completion back
through the incremental detokenizer and the streaming parser, one token at a time.

Run from the repository root:  python benchmarks/encoding_bench.py [--sizes 100000,1000000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

from encoding import (  # noqa: E402
    DeepSeekV4Tokenizer,
    StreamingParser,
    encode_messages,
    load_tokenizer,
    parse_message_from_completion_text,
)

WORDS = (
    "the model reads a million tokens of context and answers with care while the cache keeps "
    "compressed keys for every layer 模型 上下文 压缩 注意力 ünïcödé naïve café 42 3.14 (x) [y] {z} "
    "<tag> </tag> -> => :: ; , . ! ?"
).split()
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} a path",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "limit": {"type": "integer"}}},
        },
    }
    for name in ("read_file", "search", "run_tests")
]


def prose(rng: random.Random, num_words: int) -> str:
    """Deterministic word salad with newlines, mixing ASCII, CJK and accented text."""
    words = [rng.choice(WORDS) for _ in range(num_words)]
    for i in range(12, num_words, 13):
        words[i] += "\n"
    return " ".join(words)


def document_conversation(num_words: int) -> list[dict[str, Any]]:
    rng = random.Random(0)
    return [
        {"role": "system", "content": "You are a careful reader."},
        {"role": "user", "content": "Summarize this document.\n\n" + prose(rng, num_words)},
    ]


def tool_session(num_rounds: int) -> list[dict[str, Any]]:
    rng = random.Random(1)
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are an agent.", "tools": TOOLS}]
    for r in range(num_rounds):
        ids = [f"call_{r}_a", f"call_{r}_b"]
        calls = [
            {
                "id": ids[k],
                "type": "function",
                "function": {
                    "name": "read_file",
                    "arguments": json.dumps(
                        {"path": f"src/module_{r}_{k}.py", "limit": 400, "flags": [True, None, 1.5]}
                    ),
                },
            }
            for k in range(2)
        ]
        messages += [
            {"role": "user", "content": prose(rng, 40)},
            {"role": "assistant", "reasoning_content": prose(rng, 60), "content": "", "tool_calls": calls},
            {"role": "tool", "tool_call_id": ids[1], "content": prose(rng, 300)},
            {"role": "tool", "tool_call_id": ids[0], "content": prose(rng, 300)},
            {"role": "assistant", "reasoning_content": prose(rng, 40), "content": prose(rng, 80)},
        ]
    messages.append({"role": "user", "content": "Now fix the failing test."})
    return messages


def timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[Any, float]:
    """The result of ``fn`` and its fastest wall time over ``repeats`` runs."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def scale_to(build: Callable[[int], list[dict[str, Any]]], tokenizer: DeepSeekV4Tokenizer, target: int) -> int:
    """The size argument for ``build`` that gives about ``target`` prompt tokens."""
    return scale_to_tokens(lambda n: encode_messages(build(n), "thinking"), tokenizer, target)


def scale_to_tokens(make_text: Callable[[int], str], tokenizer: DeepSeekV4Tokenizer, target: int) -> int:
    probe = 200
    tokens = len(tokenizer.encode(make_text(probe)))
    return max(1, round(probe * target / tokens))


def long_completion(num_words: int) -> str:
    """A thinking-mode completion: reasoning, then the answer, then EOS."""
    rng = random.Random(2)
    return prose(rng, num_words // 2) + "</think>" + prose(rng, num_words // 2) + "<｜end▁of▁sentence｜>"


def bench_conversation(
    name: str, build: Callable[[int], list], tokenizer: DeepSeekV4Tokenizer, sizes: list[int]
) -> None:
    rows = []
    for target in sizes:
        messages = build(scale_to(build, tokenizer, target))
        # encode_messages takes milliseconds: best of 5 to keep timer noise out of the ratio.
        prompt, encode_s = timed(lambda m=messages: encode_messages(m, "thinking"), repeats=5)
        ids, tokenize_s = timed(lambda p=prompt: tokenizer.encode(p))
        rows.append((len(ids), encode_s, tokenize_s))
        print(
            f"{name:9s} {len(ids):>9,d} tokens {len(prompt):>10,d} chars | "
            f"encode_messages {encode_s:7.3f} s {len(ids) / encode_s:>12,.0f} tok/s | "
            f"tokenize {tokenize_s:7.3f} s {len(ids) / tokenize_s:>10,.0f} tok/s"
        )
    report_ratio(name, rows)


def report_ratio(name: str, rows: list[tuple[int, float, float]]) -> None:
    if len(rows) < 2:
        return
    (t0, e0, k0), (t1, e1, k1) = rows[0], rows[-1]
    print(
        f"{name:9s} ratio largest/smallest: tokens x{t1 / t0:.1f}, "
        f"encode_messages time x{e1 / e0:.1f}, tokenize time x{k1 / k0:.1f}"
    )


def bench_streaming(tokenizer: DeepSeekV4Tokenizer, sizes: list[int]) -> None:
    rows = []
    for target in sizes:
        completion = long_completion(scale_to_tokens(long_completion, tokenizer, target))
        ids = tokenizer.encode(completion)

        def stream(ids: list[int] = ids) -> dict[str, int]:
            detok, parser, sizes_out = tokenizer.detokenizer(), StreamingParser("thinking"), {}
            for token_id in ids:
                for event in parser.feed(detok.feed((token_id,))):
                    sizes_out[type(event).__name__] = sizes_out.get(type(event).__name__, 0) + 1
            parser.feed(detok.finish())
            parser.finish()
            return sizes_out

        _, stream_s = timed(stream)
        _, batch_s = timed(lambda c=completion: parse_message_from_completion_text(c, "thinking"))
        rows.append((len(ids), stream_s, batch_s))
        print(
            f"stream    {len(ids):>9,d} tokens | detokenize+parse per token {stream_s:7.3f} s "
            f"{len(ids) / stream_s:>10,.0f} tok/s | batch parse {batch_s:6.3f} s"
        )
    if len(rows) >= 2:
        (t0, s0, _), (t1, s1, _) = rows[0], rows[-1]
        print(f"stream    ratio largest/smallest: tokens x{t1 / t0:.1f}, time x{s1 / s0:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="target prompt sizes in tokens")
    parser.add_argument("--checkpoint", default=None, help="checkpoint dir whose tokenizer.json to use")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    tokenizer, load_s = timed(lambda: load_tokenizer(args.checkpoint))
    print(f"tokenizer {tokenizer.path} loaded in {load_s:.2f} s")
    bench_conversation("document", document_conversation, tokenizer, sizes)
    bench_conversation("tools", tool_session, tokenizer, sizes)
    bench_streaming(tokenizer, sizes)


if __name__ == "__main__":
    main()
