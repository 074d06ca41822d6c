from __future__ import annotations

import json
from pathlib import Path

import pytest

from workers.config import ModelConfig, ModelConfigError
from workers.presets import PRESETS, preset_config

# The official V4-Pro config.json (HF field names), kept in the repo as test data.
PRO = Path(__file__).resolve().parents[1] / "data" / "reference-config-v4-pro.json"


def pro_config() -> dict:
    return json.loads(PRO.read_text())


def flash_config() -> dict:
    # V4-Flash per docs/model.md §1 (the Flash config.json differs from Pro in these fields).
    raw = pro_config()
    raw.update(
        hidden_size=4096, num_hidden_layers=43, num_attention_heads=64, q_lora_rank=1024, o_groups=8,
        n_routed_experts=256, moe_intermediate_size=2048, index_topk=512, routed_scaling_factor=1.5,
        compress_ratios=[0, 0, 4] + [128, 4] * 20 + [0],
    )
    return raw


def test_pro_config_loads():
    cfg = ModelConfig.from_dict(pro_config())
    assert cfg.num_hidden_layers == 61 and cfg.hidden_size == 7168
    assert cfg.compress_ratio(0) == 128 and cfg.compress_ratio(2) == 4 and cfg.compress_ratio(61) == 0
    assert cfg.rope_scaling.factor == 16 and cfg.rope_scaling.original_max_position_embeddings == 65536
    assert cfg.routed_scaling_factor == 2.5 and cfg.index_topk == 1024
    assert cfg.extra["transformers_version"] == "4.57.1"  # unknown keys are kept, not lost


def test_flash_config_loads():
    cfg = ModelConfig.from_dict(flash_config())
    ratios = cfg.compress_ratios[: cfg.num_hidden_layers]
    assert (ratios.count(0), ratios.count(4), ratios.count(128)) == (2, 21, 20)


def test_round_trip_through_dict():
    cfg = ModelConfig.from_dict(pro_config())
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    "change, field",
    [
        ({"compress_ratios": [128, 4]}, "compress_ratios"),
        ({"compress_ratios": [128] * 61 + [8]}, "compress_ratios"),
        ({"o_groups": 7}, "o_groups"),
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
        ({"head_dim": 500}, "head_dim"),
        ({"index_head_dim": 96}, "index_head_dim"),
        ({"num_experts_per_tok": 1000}, "num_experts_per_tok"),
        ({"hidden_size": "big"}, "hidden_size"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling.type"),
        ({"rope_scaling": {"type": "yarn"}}, "rope_scaling.factor"),
    ],
)
def test_invalid_values_name_the_field(change, field):
    raw = pro_config()
    raw.update(change)
    with pytest.raises(ModelConfigError, match=field.replace(".", r"\.")):
        ModelConfig.from_dict(raw)


def test_missing_field_is_named():
    raw = pro_config()
    del raw["o_lora_rank"]
    with pytest.raises(ModelConfigError, match="o_lora_rank"):
        ModelConfig.from_dict(raw)


def test_from_json_errors(tmp_path):
    with pytest.raises(ModelConfigError, match="no such file"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    cfg = preset_config(name)
    assert cfg.vocab_size == 129280 and cfg.sliding_window == 128


def test_tiny_covers_every_layer_kind():
    cfg = preset_config("tiny")
    kinds = set(cfg.compress_ratios[: cfg.num_hidden_layers])
    assert kinds == {0, 4, 128} and cfg.num_hidden_layers >= 4 and cfg.num_hash_layers >= 1


def test_unknown_preset_lists_known():
    with pytest.raises(ValueError, match="tiny"):
        preset_config("huge")
