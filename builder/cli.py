"""`nnserve build`: JSON specs (or a random MLP) -> verified ONNX models in a repository."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from nnserve.builder.build import build, target_name
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
    parser.add_argument(
        "--name",
        help="model name (default: the spec's name, plus '_fp16' with --fp16); only with a single spec or --random",
    )
    parser.add_argument(
        "--version",
        type=int,
        help="version number (default: the next free one); with --fp16 and no --name, a version of the spec's "
        "own model rather than of <name>_fp16",
    )
    parser.add_argument(
        "--fp16",
        action="store_true",
        help="store weights and tensors as float16 (for GPU serving), as the model <name>_fp16 unless --name or "
        "--version say otherwise",
    )
    parser.add_argument("--random", metavar="WIDTHS", help="build a random MLP instead, e.g. 1024x4096x4096x1024")
    parser.add_argument("--seed", type=int, default=0, help="seed for --random (default: %(default)s)")
    parser.add_argument(
        "--skip-unchanged",
        action="store_true",
        help="write nothing when the latest version (or the one --version names) holds the same network and dtype",
    )
    parser.add_argument("--summary-only", action="store_true", help="validate and summarise; write nothing")
    parser.add_argument("--json", action="store_true", help="print the summaries as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        networks = _networks(args)
    except SpecError as exc:
        for problem in exc.problems:
            print(f"error: {problem.line}", file=sys.stderr)
        return 2
    except ValueError as exc:
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
                model=result.name,
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
        return _as_stored(args, [random_mlp(parse_widths(args.random), name=args.name, seed=args.seed)])
    if not args.specs:
        raise ValueError("give at least one SPEC file, or --random WIDTHS --name NAME")
    if args.name and len(args.specs) > 1:
        raise ValueError("--name applies to a single spec; drop it or build the specs one at a time")
    if args.version is not None and len(args.specs) > 1:
        raise ValueError("--version applies to a single spec")
    # Validate everything before writing anything: a broken spec in the list writes nothing, and every problem of
    # every spec is reported in one run.
    networks: list[NetworkSpec] = []
    problems: list[SpecError] = []
    for path in args.specs:
        try:
            networks.append(load_spec(path))
        except SpecError as exc:
            problems.append(exc)
    if problems:
        raise SpecError.combine(problems)
    return _as_stored(args, networks)


def _as_stored(args: argparse.Namespace, networks: list[NetworkSpec]) -> list[NetworkSpec]:
    """The networks in the dtype they will be stored in, so the summaries describe the files; their model names are
    checked here too, before anything is written."""
    stored = [network.with_dtype("float16") if args.fp16 else network for network in networks]
    problems: list[SpecError] = []
    for network in stored:
        try:
            target_name(network, name=args.name, version=args.version, fp16=args.fp16)
        except SpecError as exc:
            problems.append(exc)
    if problems:
        raise SpecError.combine(problems)
    return stored
