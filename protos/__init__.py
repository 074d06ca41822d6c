"""The gRPC API (`dsv4/v1/inference.proto`) and its Python stubs.

The stubs are generated, never committed or edited: `load()` runs grpc_tools' protoc
in-process whenever a generated module is missing or older than its .proto, then imports
it. Several processes may do this at once: each generates into its own temporary
directory and moves the files into place with `os.replace` (atomic), so an importer sees
either no file or a whole one. Where the package directory is read-only (a system-wide
install), the stubs go to a cache directory added to the package's search path.
`python -m protos` generates them ahead of time.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import tempfile
import threading
from importlib import resources
from pathlib import Path
from types import ModuleType

_ROOT = Path(__file__).resolve().parent  # .../protos
_PROTOS = ("dsv4/v1/inference.proto",)  # relative to _ROOT
_lock = threading.Lock()


def _generated(proto: str, out_root: Path) -> list[Path]:
    stem = out_root / proto.removesuffix(".proto")
    return [stem.with_name(stem.name + "_pb2.py"), stem.with_name(stem.name + "_pb2_grpc.py")]


def _is_fresh(proto: str, out_root: Path) -> bool:
    source_mtime = (_ROOT / proto).stat().st_mtime
    return all(p.is_file() and p.stat().st_mtime >= source_mtime for p in _generated(proto, out_root))


def _out_root() -> Path:
    """The package directory if we may write there, else a cache directory per .proto version."""
    if os.access(_ROOT / "dsv4" / "v1", os.W_OK):
        return _ROOT
    digest = hashlib.sha256(b"".join((_ROOT / p).read_bytes() for p in _PROTOS)).hexdigest()[:16]
    cache = Path(os.environ.get("DSV4_CACHE") or Path.home() / ".cache" / "dsv4")
    return cache / "protos" / digest


def _run_protoc(proto: str, out_root: Path) -> None:
    from grpc_tools import protoc  # a build-time tool; imported only when stubs are stale

    out_root.joinpath(proto).parent.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory(dir=out_root, prefix=".protoc-") as tmp:
        # The import path starts at the package's parent, so the stubs import each other as
        # `protos.dsv4.v1.x_pb2` (protoc writes absolute imports from the include root).
        args = [
            "grpc_tools.protoc",
            f"-I{_ROOT.parent}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(_ROOT / proto),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {_ROOT / proto}")
        for target in _generated(proto, out_root):
            os.replace(Path(tmp) / _ROOT.name / target.relative_to(out_root), target)


def generate(force: bool = False) -> Path:
    """Generate the stubs that are missing or stale; return the directory they live under."""
    out_root = _out_root()
    with _lock:
        for proto in _PROTOS:
            if force or not _is_fresh(proto, out_root):
                _run_protoc(proto, out_root)
    return out_root


def load() -> tuple[ModuleType, ModuleType]:
    """(inference_pb2, inference_pb2_grpc), generating them first when needed."""
    out_root = generate()
    if out_root != _ROOT:
        package = importlib.import_module(f"{__name__}.dsv4.v1")
        extra = str(out_root / "dsv4" / "v1")
        if extra not in package.__path__:
            package.__path__.append(extra)
    pb2 = importlib.import_module(f"{__name__}.dsv4.v1.inference_pb2")
    pb2_grpc = importlib.import_module(f"{__name__}.dsv4.v1.inference_pb2_grpc")
    return pb2, pb2_grpc


__all__ = ["generate", "load"]
