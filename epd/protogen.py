"""Compiles protos/epd/v1/*.proto into the `epd.v1` package.

Run by the build (setup.py) and, in a source checkout, on first import of
`epd.v1` when a .proto is newer than its generated module, so an editable
install never runs stale stubs."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

PACKAGE_DIR = Path(__file__).parent
PROTO_ROOT = PACKAGE_DIR.parent / "protos"
OUT_DIR = PACKAGE_DIR.parent  # protos/epd/v1/x.proto -> epd/v1/x_pb2.py


def _stale(proto: Path) -> bool:
    generated = OUT_DIR / proto.relative_to(PROTO_ROOT).with_name(proto.stem + "_pb2.py")
    return not generated.exists() or generated.stat().st_mtime < proto.stat().st_mtime


def generate(force: bool = False) -> list[Path]:
    """Compile every .proto that is missing or out of date; returns those compiled."""
    if not PROTO_ROOT.is_dir():  # installed from a wheel: the build already generated them
        return []
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    todo = protos if force else [p for p in protos if _stale(p)]
    if not todo:
        return []
    from grpc_tools import protoc

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={OUT_DIR}",
            f"--pyi_out={OUT_DIR}", f"--grpc_python_out={OUT_DIR}", *map(str, todo)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {[p.name for p in todo]}")
    return todo
