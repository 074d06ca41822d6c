"""Errors of the model side that the CLI reports without importing torch."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint on disk does not match what the caller expects; the message names tensor and file."""
