"""Fixtures of the `dsv4 bench` tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def tiny_cache(tiny_checkpoint, tmp_path, monkeypatch):
    """A $DSV4_CACHE whose tiny preset is the session's tiny checkpoint (nothing to generate)."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-seed0").symlink_to(tiny_checkpoint, target_is_directory=True)
    monkeypatch.setenv("DSV4_CACHE", str(tmp_path))
    return tmp_path
