"""Regenerate the committed Python modules for the .proto files in this folder.

Usage::

    python -m nnserve.protos.generate           # rewrite the generated files in place
    python -m nnserve.protos.generate --check   # exit 1 if they are out of date
    python protos/generate.py                   # same, run from a checkout

The committed .proto files import each other by bare file name
(``import "model_config.proto";``). To make protoc emit package-absolute Python
imports (``from nnserve.protos import model_config_pb2``), the files are copied
into a temporary tree as ``nnserve/protos/<name>.proto`` with those imports
rewritten to the same prefixed path, and protoc runs on that tree. The output
depends only on the .proto files and the grpcio-tools version, so it is
byte-for-byte reproducible.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
# Where the generated modules live as a Python package (and so as a proto path).
PACKAGE_PATH = ("nnserve", "protos")
PROTO_FILES = ("model_config.proto", "grpc_service.proto")
# Only these define services; protoc's empty *_pb2_grpc.py for the others is dropped.
SERVICE_PROTOS = ("grpc_service.proto",)

_IMPORT_RE = re.compile(r'^(\s*import\s+(?:public\s+|weak\s+)?")([^"/]+\.proto)(";)', re.MULTILINE)


def expected_outputs() -> list[str]:
    """Names of the generated files that are kept (messages, type stubs, gRPC services)."""
    names = []
    for proto in PROTO_FILES:
        stem = proto.removesuffix(".proto")
        names += [f"{stem}_pb2.py", f"{stem}_pb2.pyi"]
        if proto in SERVICE_PROTOS:
            names.append(f"{stem}_pb2_grpc.py")
    return sorted(names)


def _stage_sources(src_dir: Path, root: Path) -> list[str]:
    """Copy the .proto files under root/nnserve/protos/, prefixing local imports."""
    prefix = "/".join(PACKAGE_PATH) + "/"
    staged = root.joinpath(*PACKAGE_PATH)
    staged.mkdir(parents=True)
    local = set(PROTO_FILES)

    def prefix_local(m: re.Match[str]) -> str:
        name = m.group(2)
        return f"{m.group(1)}{prefix if name in local else ''}{name}{m.group(3)}"

    for name in PROTO_FILES:
        text = (src_dir / name).read_text(encoding="utf-8")
        (staged / name).write_text(_IMPORT_RE.sub(prefix_local, text), encoding="utf-8")
    return [prefix + name for name in PROTO_FILES]


def generate(out_dir: Path, src_dir: Path = PROTO_DIR) -> list[Path]:
    """Generate the *_pb2.py, *_pb2.pyi and *_pb2_grpc.py modules into `out_dir`.

    Returns the written paths, sorted by name. Raises RuntimeError if protoc fails.
    """
    # grpcio-tools is a development dependency: import it only when generating.
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory(prefix="nnserve-protos-") as tmp:
        src_root = Path(tmp, "src")
        gen_root = Path(tmp, "gen")
        gen_root.mkdir()
        sources = _stage_sources(src_dir, src_root)
        args = [
            "grpc_tools.protoc",
            f"--proto_path={src_root}",
            f"--proto_path={well_known}",
            f"--python_out={gen_root}",
            f"--pyi_out={gen_root}",
            f"--grpc_python_out={gen_root}",
            *sources,
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit status {rc}: {' '.join(args)}")
        produced = gen_root.joinpath(*PACKAGE_PATH)
        names = expected_outputs()
        missing = [name for name in names if not (produced / name).is_file()]
        if missing:
            raise RuntimeError(f"protoc did not write {missing}")
        written = []
        for name in names:
            target = out_dir / name
            shutil.copyfile(produced / name, target)
            written.append(target)
    return written


def stale_files(committed_dir: Path = PROTO_DIR) -> list[str]:
    """Names of generated files in `committed_dir` that are missing or differ from fresh output."""
    with tempfile.TemporaryDirectory(prefix="nnserve-protos-check-") as tmp:
        stale = []
        for fresh in generate(Path(tmp), src_dir=committed_dir):
            committed = committed_dir / fresh.name
            if not committed.is_file() or committed.read_bytes() != fresh.read_bytes():
                stale.append(fresh.name)
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write anything; exit 1 if the committed generated files are out of date",
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(
                f"out of date: {', '.join(stale)} (run: python -m nnserve.protos.generate)",
                file=sys.stderr,
            )
            return 1
        print("generated protobuf modules are up to date")
        return 0
    for path in generate(PROTO_DIR):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
