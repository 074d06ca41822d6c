"""Model shapes, one table: the full-size V4-Flash and V4-Pro (`REFERENCE_MODELS`, field
for field as their checkpoints' config.json; `dsv4 deploy` sizes them), and the presets
of `dsv4 init-model`: tiny (tests), small (benchmarks), and reduced-width copies of
V4-Flash / V4-Pro's layer pattern. All keep the real vocabulary (129280) so the real
tokenizer works, and the real window (128) and ratios (4, 128).
"""

from __future__ import annotations

from typing import Any

from workers.config import ModelConfig

ONE_M = 1_048_576  # tokens: V4's full context
_FLASH_RATIOS = [0, 0, 4] + [128, 4] * 20 + [0]  # 43 layers + MTP
_PRO_RATIOS = [128, 128, 4] + [128, 4] * 29 + [0]  # 61 layers + MTP

_COMMON: dict[str, Any] = {
    "vocab_size": 129280,
    "num_key_value_heads": 1,
    "qk_rope_head_dim": 64,
    "sliding_window": 128,
    "n_shared_experts": 1,
    "scoring_func": "sqrtsoftplus",
    "norm_topk_prob": True,
    "swiglu_limit": 10.0,
    "rms_norm_eps": 1e-6,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                     "beta_fast": 32, "beta_slow": 1},  # fmt: skip
    "max_position_embeddings": ONE_M,
    "num_nextn_predict_layers": 1,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
}

PRESETS: dict[str, dict[str, Any]] = {
    # 4 layers: window-only (hash-routed), CSA, HCA, CSA; 32 indexer heads so that top-k
    # ties are rare (parity with other implementations compares like with like).
    "tiny": {
        "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "head_dim": 128,
        "q_lora_rank": 64, "o_groups": 2, "o_lora_rank": 64, "compress_ratios": [0, 4, 128, 4, 0],
        "index_n_heads": 32, "index_head_dim": 64, "index_topk": 16, "n_routed_experts": 8,
        "num_experts_per_tok": 2, "moe_intermediate_size": 64, "num_hash_layers": 1,
        "routed_scaling_factor": 1.5,
    },
    "small": {
        "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "head_dim": 256,
        "q_lora_rank": 256, "o_groups": 4, "o_lora_rank": 256,
        "compress_ratios": [0, 0, 4, 128, 4, 128, 4, 128, 0],
        "index_n_heads": 16, "index_head_dim": 64, "index_topk": 64, "n_routed_experts": 32,
        "num_experts_per_tok": 4, "moe_intermediate_size": 256, "num_hash_layers": 2,
        "routed_scaling_factor": 1.5,
    },
    "flash-mini": {
        "hidden_size": 128, "num_hidden_layers": 43, "num_attention_heads": 4, "head_dim": 128,
        "q_lora_rank": 64, "o_groups": 2, "o_lora_rank": 64, "compress_ratios": _FLASH_RATIOS,
        "index_n_heads": 8, "index_head_dim": 64, "index_topk": 32, "n_routed_experts": 16,
        "num_experts_per_tok": 6, "moe_intermediate_size": 64, "num_hash_layers": 3,
        "routed_scaling_factor": 1.5,
    },
    "pro-mini": {
        "hidden_size": 128, "num_hidden_layers": 61, "num_attention_heads": 8, "head_dim": 128,
        "q_lora_rank": 64, "o_groups": 4, "o_lora_rank": 64, "compress_ratios": _PRO_RATIOS,
        "index_n_heads": 8, "index_head_dim": 64, "index_topk": 32, "n_routed_experts": 24,
        "num_experts_per_tok": 6, "moe_intermediate_size": 64, "num_hash_layers": 3,
        "routed_scaling_factor": 2.5,
    },
    # 1M-token requests on a CPU (benchmarks/long_context_bench.py): one layer of each kind
    # and a single indexer head, since the indexer is quadratic (about N^2/8 query-entry
    # pairs per CSA layer and head in prefill).
    "long": {
        "hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2, "head_dim": 128,
        "q_lora_rank": 64, "o_groups": 1, "o_lora_rank": 64, "compress_ratios": [0, 4, 128, 0],
        "index_n_heads": 1, "index_head_dim": 128, "index_topk": 64, "n_routed_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 64, "num_hash_layers": 1,
        "routed_scaling_factor": 1.5,
    },
}  # fmt: skip


# What the full-size models share beyond _COMMON (docs/model.md §1).
_FULL_SIZE: dict[str, Any] = {
    "num_attention_heads": 64, "head_dim": 512, "index_n_heads": 64, "index_head_dim": 128,
    "num_experts_per_tok": 6, "num_hash_layers": 3, "expert_dtype": "fp4",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
}  # fmt: skip
REFERENCE_MODELS: dict[str, dict[str, Any]] = {
    "v4-flash": {"hidden_size": 4096, "num_hidden_layers": 43, "q_lora_rank": 1024, "o_groups": 8,
                 "o_lora_rank": 1024, "compress_ratios": _FLASH_RATIOS, "index_topk": 512,
                 "n_routed_experts": 256, "moe_intermediate_size": 2048, "routed_scaling_factor": 1.5},
    "v4-pro": {"num_attention_heads": 128, "hidden_size": 7168, "num_hidden_layers": 61,
               "q_lora_rank": 1536, "o_groups": 16, "o_lora_rank": 1024,
               "compress_ratios": _PRO_RATIOS, "index_topk": 1024,
               "n_routed_experts": 384, "moe_intermediate_size": 3072, "routed_scaling_factor": 2.5},
}  # fmt: skip


def full_size_config(name: str) -> ModelConfig:
    """The ModelConfig of V4-Flash (`v4-flash`) or V4-Pro (`v4-pro`)."""
    return ModelConfig.from_dict({**_COMMON, **_FULL_SIZE, **REFERENCE_MODELS[name]})


def preset_config(name: str) -> ModelConfig:
    """The ModelConfig of a preset; an unknown name lists the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return ModelConfig.from_dict({**_COMMON, **PRESETS[name]})
