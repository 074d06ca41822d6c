from __future__ import annotations

import pytest

from tests.workers.test_config import flash_config, pro_config
from workers.config import ModelConfig
from workers.kv_cache import KVCacheManager, KVLayout
from workers.presets import preset_config


def arithmetic(cfg: ModelConfig, e: int) -> tuple[float, int]:
    """Bytes per raw token and per request, counted from the architecture by hand."""
    layers = cfg.compress_ratios[: cfg.num_hidden_layers]
    n_csa, n_hca = layers.count(4), layers.count(128)
    per_token = n_csa * (cfg.head_dim * e / 4 + cfg.index_head_dim * e / 4) + n_hca * cfg.head_dim * e / 128
    window = cfg.num_hidden_layers * cfg.sliding_window * cfg.head_dim * e
    open_blocks = n_csa * (2 * 8 * 2 * cfg.head_dim * 4 + 2 * 8 * 2 * cfg.index_head_dim * 4)
    open_blocks += n_hca * 2 * 128 * cfg.head_dim * 4
    return per_token, window + open_blocks


@pytest.mark.parametrize("cfg", [preset_config("tiny"), ModelConfig.from_dict(flash_config()),
                                 ModelConfig.from_dict(pro_config())], ids=["tiny", "flash", "pro"])  # fmt: skip
def test_bytes_per_token_matches_architecture(cfg):
    layout = KVLayout.for_model(cfg, elem_bytes=2)
    per_token, per_seq = arithmetic(cfg, 2)
    assert layout.bytes_per_token == pytest.approx(per_token)
    assert layout.bytes_per_seq == per_seq


def test_flash_is_about_a_tenth_of_v32_per_token():
    # V3.2 MLA: 61 layers x (512 + 64) dims x 1 byte (FP8) + indexer 128 dims per token, per layer.
    v32 = 61 * (576 + 128)
    flash = KVLayout.for_model(ModelConfig.from_dict(flash_config()), elem_bytes=1).bytes_per_token
    assert 0.05 < flash / v32 < 0.2


def test_pages_grow_free_and_refuse():
    kv = KVCacheManager(KVLayout(bytes_per_token=10.0, bytes_per_seq=1280), num_pages=10, page_size=64)
    assert kv.pages_per_seq == 2 and kv.pages_for(65) == 4
    assert kv.grow("a", 100) and kv.used_pages == 4
    assert kv.grow("a", 128) and kv.used_pages == 4
    assert kv.grow("b", 200) and kv.used_pages == 10
    assert not kv.grow("a", 129) and kv.held("a") == 4  # full: nothing changes
    kv.free("b")
    assert kv.free_pages == 6 and kv.grow("a", 129)
    assert kv.fits_ever(8 * 64) and not kv.fits_ever(8 * 64 + 1)
