"""Errors raised by the encoding package.

Everything here subclasses ``ValueError`` because every failure comes from outside the
process: a client's messages, the model's output, or a tokenizer file. Callers that only
know the official encoder (which raised AssertionError, KeyError, TypeError, ...) can catch
``ValueError`` and be done.
"""

from __future__ import annotations


class EncodingError(ValueError):
    """A conversation the official encoder would reject; the message names the message."""


class CompletionParseError(ValueError):
    """Model output that breaks the DeepSeek-V4 completion format.

    ``position`` is the character offset in the completion text where the problem was found.
    """

    def __init__(self, position: int, reason: str) -> None:
        super().__init__(f"at character {position}: {reason}")
        self.position = position
        self.reason = reason


class TokenizerError(ValueError):
    """A tokenizer file that does not fit the model, or ids outside the model's vocabulary."""
