"""`nnserve build`: JSON specs (or a random MLP) -> verified ONNX models in a repository."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from nnserve.builder.build import build
from nnserve.builder.random_mlp import parse_widths, random_mlp
from nnserve.builder.repository import RepositoryError
from nnserve.builder.spec import NetworkSpec, SpecError, load_spec
from nnserve.builder.summary import format_summary, summary_dict
from nnserve.builder.verify import VerificationError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "specs", nargs="*", metavar="SPEC", help="JSON network spec files (see README, 'Network specs')"
    )
    parser.add_argument(
        "--model-repository",
        "-r",
        type=Path,
        default=Path(os.environ.get("NNSERVE_MODEL_REPOSITORY", "model_repository")),
        help="repository to write <model>/<version>/model.onnx into "
        "(env NNSERVE_MODEL_REPOSITORY; default: %(default)s)",
    )
    parser.add_argument("--name", help="model name (default: the spec's name); only with a single spec or --random")
    parser.add_argument("--version", type=int, help="version number (default: the next free one)")
    parser.add_argument("--fp16", action="store_true", help="store weights and tensors as float16 (for GPU serving)")
    parser.add_argument("--random", metavar="WIDTHS", help="build a random MLP instead, e.g. 1024x4096x4096x1024")
    parser.add_argument("--seed", type=int, default=0, help="seed for --random (default: %(default)s)")
    parser.add_argument(
        "--skip-unchanged",
        action="store_true",
        help="write no new version when the latest one was built from the same network",
    )
    parser.add_argument("--summary-only", action="store_true", help="validate and summarise; write nothing")
    parser.add_argument("--json", action="store_true", help="print the summaries as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        networks = _networks(args)
    except (SpecError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results: list[dict[str, Any]] = []
    for network in networks:
        started = time.monotonic()
        record = summary_dict(network)
        if not args.summary_only:
            try:
                result = build(
                    network,
                    args.model_repository,
                    name=args.name,
                    version=args.version,
                    fp16=args.fp16,
                    skip_unchanged=args.skip_unchanged,
                )
            except (SpecError, VerificationError, RepositoryError, OSError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            record.update(
                model_path=str(result.model_path),
                version=result.version,
                stored_dtype=result.dtype,
                skipped_unchanged=result.skipped,
            )
        record["build_seconds"] = round(time.monotonic() - started, 3)
        results.append(record)
        if not args.json:
            print(format_summary(network))
            if record.get("skipped_unchanged"):
                print(f"Unchanged: {record['model_path']} (version {record['version']}) already holds this network")
            elif "model_path" in record:
                print(
                    f"Wrote {record['model_path']} (version {record['version']}, {record['stored_dtype']}, "
                    f"verified against numpy, {record['build_seconds']:.2f} s)"
                )
            print()
    if args.json:
        print(json.dumps(results if len(results) != 1 else results[0], indent=2))
    return 0


def _networks(args: argparse.Namespace) -> list[NetworkSpec]:
    if args.random and args.specs:
        raise ValueError("give either SPEC files or --random, not both")
    if args.random:
        if not args.name:
            raise ValueError("--random needs --name")
        return [random_mlp(parse_widths(args.random), name=args.name, seed=args.seed)]
    if not args.specs:
        raise ValueError("give at least one SPEC file, or --random WIDTHS --name NAME")
    if args.name and len(args.specs) > 1:
        raise ValueError("--name applies to a single spec; drop it or build the specs one at a time")
    if args.version is not None and len(args.specs) > 1:
        raise ValueError("--version applies to a single spec")
    # Validate everything before writing anything: a broken spec in the list writes nothing.
    return [load_spec(path) for path in args.specs]
