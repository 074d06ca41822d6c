"""`dsv4 chat` without a message: an interactive session that keeps the conversation, with
/thinking, /reset and /exit. Oracle for the kept history: the prompt the server reports
equals the V4 encoding of the conversation so far (the answers as the session printed them)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from encoding import encode_messages, load_tokenizer


def _prompt_tokens(messages: list[dict], mode: str) -> int:
    return len(load_tokenizer().encode(encode_messages(messages, mode)))


def test_an_interactive_session_keeps_the_conversation(tiny_checkpoint):
    turns = "Hello\nHi again\n/thinking\nMore\n/reset\nHello\n/exit\n"
    cmd = [sys.executable, "-m", "cluster.cli", "chat", "--local", "--checkpoint", str(tiny_checkpoint),
           "--max-tokens", "4", "--seed", "1", "--temperature", "0"]  # fmt: skip
    proc = subprocess.run(cmd, input=turns, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    prompts = [int(n) for n in re.findall(r"usage: prompt (\d+), completion 4", proc.stderr)]
    assert len(prompts) == 4 and "thinking mode on" in proc.stderr and "conversation reset" in proc.stderr
    answers = [line.removeprefix("> ") for line in proc.stdout.split("\n")[:2]]  # the chat-mode answers
    first = [{"role": "user", "content": "Hello"}]
    second = [*first, {"role": "assistant", "content": answers[0]}, {"role": "user", "content": "Hi again"}]
    assert prompts[0] == _prompt_tokens(first, "chat")
    assert prompts[1] == _prompt_tokens(second, "chat")
    third = [*second, {"role": "assistant", "content": answers[1]}, {"role": "user", "content": "More"}]
    assert prompts[2] == _prompt_tokens(third, "thinking")
    assert prompts[3] == _prompt_tokens(first, "thinking")  # /reset forgot the rest
    assert proc.stderr.count("thinking: ") == 2  # the turns after /thinking reason first
