"""The gRPC stubs are generated from the .proto on first import, as in a fresh clone."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import protos

SRC = Path(protos.__file__).resolve().parent
# The copy gets its own name: `protos` itself resolves to this checkout (an editable install).
IMPORT = "import fresh; pb, g = fresh.load(); print(g.__name__, pb.DESCRIPTOR.services_by_name['Inference'].full_name)"


def fresh_copy(tmp_path: Path) -> Path:
    """The protos package as a clone has it: .proto and __init__ files, no generated code."""
    dst = tmp_path / "fresh"
    shutil.copytree(SRC, dst, ignore=shutil.ignore_patterns("*_pb2*.py", "__pycache__"))
    assert not list(dst.rglob("*_pb2*.py"))
    return dst


def test_fresh_clone_generates_stubs_even_when_two_processes_race(tmp_path):
    dst = fresh_copy(tmp_path)
    procs = [
        subprocess.Popen([sys.executable, "-c", IMPORT], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs == [
        "fresh.dsv4.v1.inference_pb2_grpc dsv4.v1.Inference"
    ] * 2
    generated = sorted(p.name for p in (dst / "dsv4" / "v1").glob("*_pb2*.py"))
    assert generated == ["inference_pb2.py", "inference_pb2_grpc.py"]
    assert not list(dst.rglob(".protoc-*"))  # temporary directories are cleaned up


def test_stale_stubs_are_regenerated(tmp_path):
    dst = fresh_copy(tmp_path)
    subprocess.run([sys.executable, "-c", IMPORT], cwd=tmp_path, check=True, capture_output=True)
    proto = dst / "dsv4" / "v1" / "inference.proto"
    proto.write_text(proto.read_text().replace("message AbortResponse {}", "message AbortResponse { bool found = 1; }"))
    check = IMPORT + "; print('found' in pb.AbortResponse.DESCRIPTOR.fields_by_name)"
    out = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    assert out.split()[1:] == ["dsv4.v1.Inference", "True"]
