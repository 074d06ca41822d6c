"""Every kernel, as its launcher calls it at V4-Flash decode shapes with bf16 inputs (fp32 where the
model computes in fp32), goes through Triton's real compiler front end and GPU layout passes (to TTGIR,
for sm_90) on a machine without a GPU: the interpreter never sees type and shape errors that only
compiled mode raises."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

import kernels
from kernels import _triton
from tests.kernels.helpers import requires_triton

META = torch.device("meta")
_TYPES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64",
          torch.uint8: "u8", torch.float8_e4m3fn: "fp8e4nv"}  # fmt: skip


def _launches() -> dict[str, Any]:
    """name -> a launcher call on meta tensors (nothing runs; the launch is captured)."""
    bf = {"device": META, "dtype": torch.bfloat16}
    u8 = {"device": META, "dtype": torch.uint8}
    rows_csa = (torch.empty(64, 8, 1024, device=META), torch.empty(64, 8, 1024, device=META))  # ring gathers
    return {
        "sparse_attention": lambda: kernels.sparse_attention_triton(
            torch.empty(64, 64, 512, **bf), torch.empty(4096, 512, **bf),
            torch.empty(64, 640, dtype=torch.int32, device=META), torch.empty(64, device=META), 512**-0.5,
        ),
        "indexer_topk": lambda: kernels.indexer_topk_triton(
            torch.empty(4, 64, 128, **bf), torch.empty(4, 64, device=META), torch.empty(16384, 128, **bf),
            torch.empty(4, dtype=torch.int32, device=META), 512,
        ),
        "indexer_topk_paged": lambda: kernels.indexer_topk_paged_triton(
            torch.empty(64, 64, 128, **bf), torch.empty(64, 64, device=META), torch.empty(16384, 128, **bf),
            torch.empty(64, 512, dtype=torch.int64, device=META), 32,
            torch.empty(64, dtype=torch.int64, device=META), 512,
        ),
        "fp4_grouped_gemm": lambda: kernels.fp4_grouped_gemm_triton(
            torch.empty(384, 4096, **bf), torch.empty(256, 2048, 2048, **u8), torch.empty(256, 2048, 128, **u8),
            torch.empty(257, dtype=torch.int64, device=META),
        ),
        "fp8_gemm": lambda: kernels.fp8_gemm_triton(
            torch.empty(64, 4096, **bf), torch.empty(1024, 4096, dtype=torch.float8_e4m3fn, device=META),
            torch.empty(8, 32, dtype=torch.float8_e8m0fnu, device=META),
        ),
        "fp8_gemm fp32 scales": lambda: kernels.fp8_gemm_triton(
            torch.empty(64, 4096, **bf), torch.empty(1024, 4096, dtype=torch.float8_e4m3fn, device=META),
            torch.empty(8, 32, device=META),
        ),
        "compressor_pool csa": lambda: kernels.compressor_pool_triton(
            *(t[:, 4:] for t in rows_csa), *(t[:, :4] for t in rows_csa)
        ),
        "compressor_pool hca": lambda: kernels.compressor_pool_triton(
            torch.empty(64, 128, 512, device=META), torch.empty(64, 128, 512, device=META)
        ),
        "sinkhorn": lambda: kernels.sinkhorn_triton(torch.empty(64, 4, 4, device=META), 20, 1e-6),
        "rmsnorm_rope q": lambda: kernels.rmsnorm_rope_triton(
            torch.empty(64, 64, 512, **bf), None, torch.empty(64, 32, device=META), torch.empty(64, 32, device=META),
            1e-6,
        ),
        "rmsnorm_rope kv": lambda: kernels.rmsnorm_rope_triton(
            torch.empty(64, 512, **bf), torch.empty(512, device=META), torch.empty(64, 32, device=META),
            torch.empty(64, 32, device=META), 1e-6,
        ),
    }  # fmt: skip


def _capture(monkeypatch: pytest.MonkeyPatch, call: Any) -> tuple[_triton.Kernel, tuple, dict]:
    seen: list[tuple[_triton.Kernel, tuple, dict]] = []

    def record(self: _triton.Kernel, grid: tuple[int, ...]) -> Any:
        return lambda *args, **kwargs: seen.append((self, args, kwargs))

    monkeypatch.setattr(_triton.Kernel, "__getitem__", record)
    for name, module in sys.modules.items():
        if name.startswith("kernels.") and hasattr(module, "interpreting"):
            monkeypatch.setattr(module, "interpreting", lambda device: False)  # the compiled-mode arguments
    call()
    assert len(seen) == 1
    return seen[0]


def _ttgir(k: _triton.Kernel, args: tuple, kwargs: dict) -> None:
    """Drive Triton's pipeline to TTGIR; a Triton whose internals differ skips, a kernel error fails."""
    try:
        import triton
        from triton.compiler.errors import CompilationError
    except ImportError as e:  # pragma: no cover - depends on Triton's internals
        pytest.skip(f"this Triton has no compile pipeline we know how to drive: {e}")
    try:
        _drive_pipeline(triton, k, args, kwargs)
    except CompilationError:
        raise
    except (ImportError, AttributeError, TypeError, KeyError) as e:  # pragma: no cover
        pytest.skip(f"this Triton's compile internals differ from 3.7: {type(e).__name__}: {e}")


def _drive_pipeline(triton: Any, k: _triton.Kernel, args: tuple, kwargs: dict) -> None:
    import triton._C.libtriton as libtriton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    fn = triton.jit(k.fn)
    names = fn.arg_names
    meta = {n: v for n, v in kwargs.items() if n in names}
    sig: dict[str, str] = {}
    for name, value in zip([n for n in names if n not in meta], args, strict=True):
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + _TYPES[value.dtype]
        else:
            sig[name] = "fp32" if isinstance(value, float) else "i32"
    sig.update({n: "constexpr" for n in meta})
    target = GPUTarget("cuda", 90, 32)
    backend = CUDABackend(target)
    options = backend.parse_options({"num_warps": kwargs.get("num_warps", 4)})
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in meta.items()})
    ctx = libtriton.ir.context()
    libtriton.ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(), ctx)
    stages: dict[str, Any] = {}
    backend.add_stages(stages, options, src.language)
    stages["ttgir"](stages["ttir"](module, {}), {})


@requires_triton
@pytest.mark.parametrize("name", list(_launches()))
def test_kernel_compiles_for_sm90(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    k, args, kwargs = _capture(monkeypatch, _launches()[name])
    assert kwargs.get("DOT_F32", False) is False  # the CUDA path, not the interpreter's
    _ttgir(k, args, kwargs)
