"""DeepSeek-V4 mixture of experts (docs/model.md §6): sqrt-softplus gate with a selection-only
bias (or hash routing through `tid2eid` on the first layers; the gate is router.gate.Gate),
clamped SwiGLU experts and one shared expert.

Legend: T tokens, d hidden, I expert width, E routed experts (E_local held here),
K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels.quant import act_qdq, dequant_fp4_weight, quant_fp4_weight
from router.gate import Gate
from workers.config import ModelConfig
from workers.layers import Linear

_PROJECTIONS = ("w1", "w2", "w3")


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(gate, L)) * clamp(up, -L, L) in fp32; no clamp when L <= 0."""
    gate, up = gate.float(), up.float()
    if limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


class Expert(nn.Module):
    """The shared expert (same math as a routed one)."""

    def __init__(self, dim: int, inter: int, limit: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.limit = limit
        self.w1 = Linear(dim, inter, dtype)
        self.w2 = Linear(inter, dim, dtype)
        self.w3 = Linear(dim, inter, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x), self.limit).to(x.dtype))


class ExpertGroup(nn.Module):
    """Routed experts stacked per projection: w1/w3 [E_local, I, d], w2 [E_local, d, I].

    `expert_ids[k]` is the global id of local expert k; the checkpoint names them
    `experts.{id}.w{1,2,3}.weight`. Experts stored in FP4 (or FP8) get the official
    GEMM numerics (`act_quant`, set by the loader): each GEMM's input rounded to e4m3 per
    token and 128 channels; on the kernel path (GPU) FP4 experts run
    `kernels.fp4_grouped_gemm` on packed e2m1 weights (re-quantized from the loaded ones,
    exactly: their per-32 scales are powers of two).

    `pack_fp4()` makes those packed weights resident instead: buffers `w{1,2,3}_fp4`
    [E_local, N, K/2] uint8 and `w{1,2,3}_scale` [E_local, N, K/32] ue8m0 replace the
    parameters; the torch path then dequantizes the experts a call uses (same values).
    """

    def __init__(self, dim: int, inter: int, expert_ids: list[int], limit: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.expert_ids = list(expert_ids)
        self.limit = limit
        e = len(expert_ids)
        self.w1 = nn.Parameter(torch.empty(e, inter, dim, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e, dim, inter, dtype=dtype), requires_grad=False)
        self.w3 = nn.Parameter(torch.empty(e, inter, dim, dtype=dtype), requires_grad=False)
        self.act_quant = False
        self.weight_format: str | None = None  # 'fp4' / 'fp8' when the checkpoint stored them so
        self.is_packed = False
        self.compute_dtype = dtype
        self._fp4: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # w1/w2/w3 -> (packed [E, N, K/2], scales)

    def pack_fp4(self) -> None:
        """Keep only the packed e2m1 weights and their scales (for experts stored in FP4)."""
        assert self.weight_format == "fp4" and not self.is_packed, "only unpacked FP4 experts pack"
        self.compute_dtype = self.w1.dtype
        for name in _PROJECTIONS:
            w = getattr(self, name)
            packed, scale = quant_fp4_weight(w.detach().flatten(0, 1))
            delattr(self, name)
            self.register_buffer(f"{name}_fp4", packed.view(*w.shape[:2], -1))
            self.register_buffer(f"{name}_scale", scale.view(*w.shape[:2], -1))
        self.is_packed, self._fp4 = True, {}

    def kernel_copy_bytes(self) -> int:
        """Bytes of the e2m1 copies the kernel path re-quantized lazily (0 when packed: nothing is copied)."""
        return sum(t.numel() * t.element_size() for pair in self._fp4.values() for t in pair)

    def forward(self, x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Rows x [P, d] with local expert ids [P] and gate weights [P] -> weighted outputs [P, d] fp32.

        Rows are sorted by expert and run as one grouped GEMM per projection.
        """
        dtype = self.compute_dtype if self.is_packed else self.w1.dtype
        order = torch.argsort(local_ids, stable=True)
        counts = expert_counts(local_ids, len(self.expert_ids))
        xs = x[order].to(dtype)
        xs = act_qdq(xs) if self.act_quant else xs
        gemm = self._gemm(counts, xs)
        h = swiglu(gemm("w1", xs), gemm("w3", xs), self.limit)
        h = (h * weights[order, None]).to(dtype)
        h = act_qdq(h) if self.act_quant else h
        y = gemm("w2", h).float()
        out = torch.empty_like(y)
        out[order] = y
        return out

    def _gemm(self, counts: torch.Tensor, x: torch.Tensor):
        """(projection name, rows sorted by expert) -> rows times that projection of their expert."""
        if self.weight_format == "fp4" and kernels.use_triton(x):
            offsets = F.pad(torch.cumsum(counts, 0), (1, 0))
            return lambda name, rows: kernels.fp4_grouped_gemm(rows, *self._packed(name), offsets)
        if self.is_packed:  # only the experts with rows, dequantized for this call
            used = counts.nonzero().flatten()
            return lambda name, rows: grouped_linear(rows, self._dequantized(name, used), counts[used])
        return lambda name, rows: grouped_linear(rows, getattr(self, name), counts)

    def _packed(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_packed:
            return getattr(self, f"{name}_fp4"), getattr(self, f"{name}_scale")
        w = getattr(self, name)
        if name not in self._fp4 or self._fp4[name][0].device != w.device:
            packed, scale = quant_fp4_weight(w.flatten(0, 1))
            self._fp4[name] = (packed.view(*w.shape[:2], -1), scale.view(*w.shape[:2], -1))
        return self._fp4[name]

    def _dequantized(self, name: str, local_ids: torch.Tensor) -> torch.Tensor:
        """The resident experts `local_ids` [U] of projection `name` -> [U, N, K] in the compute dtype."""
        packed, scale = (t[local_ids] for t in self._packed(name))
        w = dequant_fp4_weight(packed.flatten(0, 1), scale.flatten(0, 1))
        return w.view(*packed.shape[:2], -1).to(self.compute_dtype)


def expert_counts(ids: torch.Tensor, experts: int) -> torch.Tensor:
    """Rows per expert [E] of ids [P]: `bincount` without its host sync on CUDA (it reads the max)."""
    return torch.zeros(experts, dtype=torch.int64, device=ids.device).index_add_(0, ids, torch.ones_like(ids))


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [P, in] sorted by group, w [G, out, in], counts [G] -> [P, out]: row block g times w[g]^T."""
    aligned = (x.shape[1] * x.element_size()) % 16 == 0 and (w.shape[1] * w.element_size()) % 16 == 0
    supported = x.device.type == "cpu" or x.dtype == torch.bfloat16  # CUDA's grouped_mm: bf16 only
    if hasattr(F, "grouped_mm") and x.shape[0] > 0 and aligned and supported:  # needs 16-byte row strides
        offs = torch.cumsum(counts, 0).to(torch.int32)
        return F.grouped_mm(x, w.transpose(1, 2), offs=offs)
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for g, n in enumerate(counts.tolist()):
        if n:
            out[start : start + n] = x[start : start + n] @ w[g].T
            start += n
    return out


class MoE(nn.Module):
    """Gate + routed experts + shared expert for one layer.

    With `expert_ids` a subset, only those experts' weights exist here and the routed sum
    covers only them (an expert-parallel worker's local part; the rest is computed where
    those experts live).
    """

    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: torch.dtype, expert_ids: list[int] | None = None):
        super().__init__()
        ids = list(range(cfg.n_routed_experts)) if expert_ids is None else sorted(expert_ids)
        d, inter, limit = cfg.hidden_size, cfg.moe_intermediate_size, cfg.swiglu_limit
        self.gate = Gate(cfg, layer_id)
        self.experts = ExpertGroup(d, inter, ids, limit, dtype)
        self.shared_experts = Expert(d, inter, limit, dtype)
        to_local = torch.full((cfg.n_routed_experts,), -1, dtype=torch.int64)
        to_local[torch.tensor(ids, dtype=torch.int64)] = torch.arange(len(ids))
        self.register_buffer("to_local", to_local, persistent=False)  # global expert id -> local, -1 elsewhere
        self.all_local = len(ids) == cfg.n_routed_experts  # then every pick is routed here: no filtering

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """x [T, d] (ffn_norm output) -> [T, d] in x's dtype."""
        weights, ids = self.gate(x, input_ids)
        k = ids.shape[1]
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(k)
        local, weights = self.to_local[ids.flatten()], weights.flatten()
        if not self.all_local:  # an expert-parallel part: only the picks of experts held here
            keep = local >= 0
            rows, local, weights = rows[keep], local[keep], weights[keep]
        routed = self.experts(x[rows], local, weights)
        y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, rows, routed)
        y += self.shared_experts(x).float()
        return y.to(x.dtype)
