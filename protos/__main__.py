"""`python -m protos`: generate the gRPC stubs now (they are otherwise made on first use)."""

from __future__ import annotations

from protos import generate

if __name__ == "__main__":
    print(f"stubs generated under {generate(force=True)}")
