"""DeepSeek-V4 conversation <-> text <-> tokens.

Drop-in for DeepSeek's official ``encoding_dsv4.py``::

    from encoding import encode_messages, parse_message_from_completion_text

plus a streaming completion parser, the V4 tokenizer and a streaming detokenizer.
"""

from __future__ import annotations

from encoding.errors import CompletionParseError, EncodingError, TokenizerError
from encoding.parse import parse_message_from_completion_text
from encoding.render import encode_messages
from encoding.streaming import (
    ArgumentsDelta,
    ContentDelta,
    End,
    Event,
    ReasoningDelta,
    StreamingParser,
    ToolCall,
    ToolCallStart,
)
from encoding.tokenizer import (
    BOS_ID,
    EOS_ID,
    SPECIAL_TOKEN_IDS,
    VOCAB_SIZE,
    DeepSeekV4Tokenizer,
    IncrementalDetokenizer,
    default_tokenizer_path,
    load_tokenizer,
)

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "SPECIAL_TOKEN_IDS",
    "VOCAB_SIZE",
    "CompletionParseError",
    "ContentDelta",
    "DeepSeekV4Tokenizer",
    "EncodingError",
    "End",
    "Event",
    "IncrementalDetokenizer",
    "ReasoningDelta",
    "StreamingParser",
    "TokenizerError",
    "ToolCall",
    "ToolCallStart",
    "ArgumentsDelta",
    "default_tokenizer_path",
    "encode_messages",
    "load_tokenizer",
    "parse_message_from_completion_text",
]
