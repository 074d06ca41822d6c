"""`ModelConfig`: the checkpoint's HF `config.json`, field for field, validated.

Field names are the HF names (see `tests/data/reference-config-v4-pro.json`); the
reference code's names are in the comments. Every behaviour is a named field: nothing
is inferred from a dimension.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ModelConfigError(ValueError):
    """A config.json that is missing a field or holds an impossible value."""


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters; applied only on compressed (ratio != 0) layers."""

    factor: float = 16.0
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    type: str = "yarn"


_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "head_dim",
    "q_lora_rank",
    "o_groups",
    "o_lora_rank",
    "compress_ratios",
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int  # dim
    num_hidden_layers: int  # n_layers
    num_attention_heads: int  # n_heads
    head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    compress_ratios: tuple[int, ...]  # per layer (+ MTP): 0 window only, 4 CSA, 128 HCA
    n_routed_experts: int
    num_experts_per_tok: int  # n_activated_experts
    moe_intermediate_size: int  # moe_inter_dim (routed and shared)
    num_key_value_heads: int = 1
    qk_rope_head_dim: int = 64  # rope_head_dim
    sliding_window: int = 128  # window_size
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_shared_experts: int = 1
    num_hash_layers: int = 3  # n_hash_layers
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.0  # route_scale
    norm_topk_prob: bool = True
    swiglu_limit: float = 10.0
    rms_norm_eps: float = 1e-6  # norm_eps
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    max_position_embeddings: int = 1048576
    num_nextn_predict_layers: int = 1  # n_mtp_layers
    bos_token_id: int = 0
    eos_token_id: int = 1
    tie_word_embeddings: bool = False
    expert_dtype: str | None = None  # "fp4" in the FP4 release
    quantization_config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        _validate(self)

    # -- derived views -------------------------------------------------------------
    def compress_ratio(self, layer_id: int) -> int:
        """Ratio of main layer `layer_id`, or of MTP block k at `num_hidden_layers + k`."""
        return self.compress_ratios[layer_id]

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def num_layers_with_mtp(self) -> int:
        return self.num_hidden_layers + self.num_nextn_predict_layers

    # -- (de)serialisation -----------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise ModelConfigError(f"config.json: missing required field(s) {missing}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in raw.items() if k in names}
        kwargs["extra"] = {k: v for k, v in raw.items() if k not in names}
        kwargs["compress_ratios"] = _int_tuple(raw["compress_ratios"], "compress_ratios")
        rs = raw.get("rope_scaling", "absent")
        if rs == "absent":
            kwargs.pop("rope_scaling", None)
        elif rs is None:
            kwargs["rope_scaling"] = None
        else:
            kwargs["rope_scaling"] = _rope_scaling(rs)
        for key, value in list(kwargs.items()):
            if key in _INT_FIELDS and not _is_int(value):
                raise ModelConfigError(f"config.json: field {key!r} must be an integer, got {value!r}")
            if key in _FLOAT_FIELDS and not isinstance(value, (int, float)):
                raise ModelConfigError(f"config.json: field {key!r} must be a number, got {value!r}")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ModelConfigError(f"{path}: no such file") from e
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(raw, dict):
            raise ModelConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """The HF `config.json` form (loads in transformers' `DeepseekV4Config` too)."""
        out: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "attention_bias": False,
            "hidden_act": "silu",
            "topk_method": "noaux_tc",
            "torch_dtype": "bfloat16",
        }
        out.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name == "compress_ratios":
                value = list(value)
            elif f.name == "rope_scaling" and value is not None:
                value = dataclasses.asdict(value)
            out[f.name] = value
        return out


_INT_FIELDS = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
    "q_lora_rank", "o_groups", "o_lora_rank", "n_routed_experts", "num_experts_per_tok",
    "moe_intermediate_size", "num_key_value_heads", "qk_rope_head_dim", "sliding_window",
    "index_n_heads", "index_head_dim", "index_topk", "n_shared_experts", "num_hash_layers",
    "hc_mult", "hc_sinkhorn_iters", "max_position_embeddings", "num_nextn_predict_layers",
}  # fmt: skip
_FLOAT_FIELDS = {
    "routed_scaling_factor", "swiglu_limit", "rms_norm_eps", "hc_eps", "rope_theta",
    "compress_rope_theta",
}  # fmt: skip


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_tuple(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
        raise ModelConfigError(f"config.json: field {name!r} must be a list of integers, got {value!r}")
    return tuple(value)


def _rope_scaling(raw: Any) -> RopeScaling:
    if not isinstance(raw, dict):
        raise ModelConfigError(f"config.json: field 'rope_scaling' must be an object, got {raw!r}")
    kind = raw.get("type", raw.get("rope_type", "yarn"))
    if kind != "yarn":
        raise ModelConfigError(f"config.json: field 'rope_scaling.type' must be 'yarn', got {kind!r}")
    try:
        return RopeScaling(
            factor=float(raw["factor"]),
            original_max_position_embeddings=int(raw["original_max_position_embeddings"]),
            beta_fast=float(raw.get("beta_fast", 32)),
            beta_slow=float(raw.get("beta_slow", 1)),
        )
    except KeyError as e:
        raise ModelConfigError(f"config.json: field 'rope_scaling.{e.args[0]}' is missing") from e


def _check(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise ModelConfigError(f"config.json: field {name!r} {why}")


def _validate(c: ModelConfig) -> None:
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                 "q_lora_rank", "o_groups", "o_lora_rank", "n_routed_experts", "num_experts_per_tok",
                 "moe_intermediate_size", "sliding_window", "hc_mult", "hc_sinkhorn_iters"):  # fmt: skip
        _check(getattr(c, name) > 0, name, f"must be positive, got {getattr(c, name)}")
    n_total = c.num_hidden_layers + c.num_nextn_predict_layers
    _check(
        len(c.compress_ratios) >= n_total,
        "compress_ratios",
        f"has {len(c.compress_ratios)} entries; needs num_hidden_layers + num_nextn_predict_layers = {n_total}",
    )
    bad = sorted({r for r in c.compress_ratios if r not in (0, 4, 128)})
    _check(not bad, "compress_ratios", f"holds ratio(s) {bad}; only 0, 4 and 128 exist")
    _check(c.num_key_value_heads == 1, "num_key_value_heads", "must be 1 (one shared K=V head)")
    _check(c.num_attention_heads % c.o_groups == 0, "o_groups",
           f"({c.o_groups}) must divide num_attention_heads ({c.num_attention_heads})")
    rd = c.qk_rope_head_dim
    _check(0 < rd < c.head_dim and rd % 2 == 0, "qk_rope_head_dim", f"must be even and in (0, head_dim), got {rd}")
    _check((c.head_dim - rd) % 64 == 0, "head_dim",
           f"minus qk_rope_head_dim must be a multiple of 64 (FP8 block), got {c.head_dim - rd}")
    ci = c.index_head_dim
    _check(ci >= 32 and ci & (ci - 1) == 0, "index_head_dim", f"must be a power of two >= 32, got {ci}")
    _check(rd <= ci, "qk_rope_head_dim", f"({rd}) must not exceed index_head_dim ({ci})")
    _check(c.index_n_heads > 0, "index_n_heads", "must be positive")
    _check(c.index_topk > 0, "index_topk", "must be positive")
    _check(c.num_experts_per_tok <= c.n_routed_experts, "num_experts_per_tok",
           f"({c.num_experts_per_tok}) exceeds n_routed_experts ({c.n_routed_experts})")
    _check(c.n_shared_experts == 1, "n_shared_experts", "must be 1 (as in the reference code)")
    _check(0 <= c.num_hash_layers <= c.num_hidden_layers, "num_hash_layers",
           f"must be in [0, num_hidden_layers], got {c.num_hash_layers}")
    _check(c.scoring_func in ("sqrtsoftplus", "softmax", "sigmoid"), "scoring_func",
           f"must be sqrtsoftplus, softmax or sigmoid, got {c.scoring_func!r}")
    _check(c.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
    _check(c.expert_dtype in (None, "fp4", "fp8"), "expert_dtype", f"must be null, fp4 or fp8, got {c.expert_dtype!r}")
    _check(math.isfinite(c.rms_norm_eps) and c.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
