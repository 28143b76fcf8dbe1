"""Regenerate the Python modules of every .proto under proto/prefloop/v1/ (the only way they are made).

Run from anywhere: `python proto/generate.py` (needs grpcio-tools: `pip install -e .[dev]`).
For each `X.proto` it writes `X_pb2.py`, `X_pb2.pyi` and `X_pb2_grpc.py` beside the source, then
rewrites protoc's absolute imports (`from prefloop.v1 import ...`) to the installed package name
(`from prefloop.proto.prefloop.v1 import ...`), so cross-file imports work under the pyproject's
`prefloop.proto` -> proto/ mapping. Generated files are committed and never edited by hand.
`--check` regenerates into a temporary folder and fails if the committed files differ.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent  # holds prefloop/v1/*.proto
PROTO_PACKAGE_DIR = Path("prefloop") / "v1"
IMPORT_PREFIX = "prefloop.proto."  # what `prefloop.v1` becomes in generated imports
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

# protoc writes `from prefloop.v1 import x_pb2 as ...` and `import prefloop.v1.x_pb2`.
_IMPORT_PATTERNS = (
    (re.compile(r"^from prefloop\.v1 import ", re.M), f"from {IMPORT_PREFIX}prefloop.v1 import "),
    (re.compile(r"^import prefloop\.v1\.", re.M), f"import {IMPORT_PREFIX}prefloop.v1."),
)


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    return sorted((root / PROTO_PACKAGE_DIR).glob("*.proto"))


def fix_imports(text: str) -> str:
    for pattern, replacement in _IMPORT_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def generate(out_root: Path) -> list[Path]:
    """Compile every .proto into out_root/prefloop/v1/; returns the generated files."""
    from grpc_tools import protoc
    import grpc_tools

    sources = proto_files()
    if not sources:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / PROTO_PACKAGE_DIR}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p.relative_to(PROTO_ROOT)) for p in sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed (see above)")
    generated = []
    for path in sorted((out_root / PROTO_PACKAGE_DIR).iterdir()):
        if path.name.endswith(GENERATED_SUFFIXES):
            path.write_text(fix_imports(path.read_text()))
            generated.append(path)
    return generated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="fail if the committed generated files are out of date")
    args = parser.parse_args(argv)
    target_dir = PROTO_ROOT / PROTO_PACKAGE_DIR
    with tempfile.TemporaryDirectory() as tmp:
        tmp_root = Path(tmp)
        (tmp_root / PROTO_PACKAGE_DIR).mkdir(parents=True)
        generated = generate(tmp_root)
        if args.check:
            stale = [p.name for p in generated
                     if not (target_dir / p.name).is_file()
                     or (target_dir / p.name).read_text() != p.read_text()]
            if stale:
                print("out of date: " + ", ".join(stale) + " (run python proto/generate.py)")
                return 1
            print(f"up to date: {len(generated)} generated files")
            return 0
        # Remove modules of deleted .proto files, then move the fresh ones in.
        fresh = {p.name for p in generated}
        for old in target_dir.iterdir():
            if old.name.endswith(GENERATED_SUFFIXES) and old.name not in fresh:
                old.unlink()
        for path in generated:
            shutil.copyfile(path, target_dir / path.name)
            print(f"wrote {(target_dir / path.name).relative_to(PROTO_ROOT.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
