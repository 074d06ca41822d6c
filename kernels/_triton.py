"""Optional Triton import and kernels that pick compiled or interpreted mode at launch.

`triton.jit` decides between compiled code and the interpreter when a kernel is defined,
from `TRITON_INTERPRET`. Kernels here are defined at import time but built at first
launch, per mode: tensors on CUDA run compiled code (unless `TRITON_INTERPRET=1`), any
other device runs Triton's interpreter. So importing `kernels` before a test sets the
variable is harmless, and importing it without Triton installed works (launches fail).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the references still work
    triton = None
    tl = None

HAS_TRITON = triton is not None


def interpreting(device: torch.device) -> bool:
    """True when a launch on `device` runs Triton's interpreter rather than compiled code."""
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


class Kernel:
    """A `@triton.jit` function built lazily; `KERNEL[grid](*args, **meta)` launches it."""

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        self._built: dict[bool, Any] = {}

    def _build(self, interpret: bool) -> Any:
        if interpret not in self._built:
            if triton is None:
                raise RuntimeError("triton is not installed")
            if interpret:
                from triton.runtime.interpreter import InterpretedFunction

                self._built[interpret] = InterpretedFunction(self.fn)
            else:
                self._built[interpret] = triton.jit(self.fn)
        return self._built[interpret]

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            interpret = interpreting(device)
            if not interpret:
                self._build(False)[grid](*args, **kwargs)
                return
            with _interpretable_stdlib():
                self._build(True)[grid](*args, **kwargs)

        return launch


_STDLIB_LOCK = threading.Lock()
_MISSING = object()


@contextmanager
def _interpretable_stdlib() -> Iterator[None]:
    """Let interpreted kernels call `tl.max`, `tl.sort`, ... when Triton was imported without
    `TRITON_INTERPRET=1`: those library functions were then built as compiled-mode `JITFunction`s,
    which refuse to run in the interpreter, so swap in interpreted twins for the launch."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    try:  # imported lazily by the launcher; it wraps the library and must see the originals
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        pass
    owners = [tl, tl.core, tl.standard, tl.math, tl.tensor]
    patched = [*owners, tl.core.tensor_descriptor_base] if hasattr(tl.core, "tensor_descriptor_base") else owners
    with _STDLIB_LOCK:
        before = [(o, dict(vars(o))) for o in patched]
        saved = [(o, k, v) for o in owners for k, v in vars(o).items() if isinstance(v, JITFunction)]
        try:
            for owner, name, fn in saved:
                setattr(owner, name, InterpretedFunction(fn.fn))
            yield
        finally:
            # An interpreted library call patches triton.language for the interpreter and
            # never undoes it (Triton 3.7), which would break later compiled-mode kernels
            # in this process: put every attribute it replaced back (names it added stay:
            # cached rewritten kernels refer to them).
            for owner, attrs in before:
                for name, value in attrs.items():
                    if vars(owner).get(name, _MISSING) is not value:
                        setattr(owner, name, value)


def kernel(fn: Callable[..., None]) -> Kernel:
    """Decorator: mark a Triton kernel body (no helper `@jit` calls inside; keep kernels flat)."""
    return Kernel(fn)


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
