"""`nnserve infer`: send one request from the command line and print the outputs as a table or JSON.

Input data is cast to the datatype the model declares (JSON numbers carry no precision), and a single row without
the batch dimension (`--data '[1.5, -0.5]'` for a `[-1, 2]` input) gets one added.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from nnserve.client.cli_common import (
    EXIT_OK,
    UsageError,
    add_connection_arguments,
    format_table,
    make_client,
    report_error,
)
from nnserve.client.datatypes import to_datatype, to_numpy_dtype
from nnserve.client.errors import InferenceError
from nnserve.client.types import InferResult, ModelMetadata


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `nnserve infer`."""
    parser.add_argument("model", metavar="MODEL", help="model name")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument(
        "--data", metavar="JSON", help="input rows as JSON, e.g. '[[1.5, -0.5]]'; an object {\"name\": rows} per input"
    )
    data.add_argument(
        "--file", metavar="PATH", type=Path, help="input from a .npy, .npz (one array per input) or .json"
    )
    parser.add_argument("--input", metavar="NAME", help="input name for a bare array (default: the model's only input)")
    parser.add_argument("--output", metavar="NAME", action="append", help="output to return (repeatable; default all)")
    parser.add_argument("--version", help="model version (default: the server's choice)")
    parser.add_argument("--json", action="store_true", help="print the response as JSON")
    add_connection_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run `nnserve infer`; exit codes per `nnserve.client.cli_common`."""
    try:
        raw = _read_data(args)
        with make_client(args) as client:
            metadata = client.model_metadata(args.model, args.version)
            inputs = _prepare_inputs(raw, metadata, args.input)
            result = client.infer_result(args.model, inputs, version=args.version, outputs=args.output)
    except (InferenceError, UsageError, OSError, ValueError) as error:
        return report_error("infer", error)
    print(json.dumps(_as_json(result), indent=2) if args.json else _as_table(result))
    return EXIT_OK


def _read_data(args: argparse.Namespace) -> Any:
    """The parsed input: an array-like, or a dict of name -> array-like."""
    if args.data is not None:
        return _parse_json(args.data, "--data")
    path: Path = args.file
    if not path.is_file():
        raise UsageError(f"--file {path}: no such file")
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    if path.suffix == ".json":
        return _parse_json(path.read_text(), str(path))
    raise UsageError(f"--file {path}: expected a .npy, .npz or .json file")


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{source}: invalid JSON: {error}") from None


def _prepare_inputs(raw: Any, metadata: ModelMetadata, input_name: str | None) -> dict[str, np.ndarray]:
    """Name, cast and (for a single row) batch the data per the model's signature."""
    declared = {tensor.name: tensor for tensor in metadata.inputs}
    if isinstance(raw, dict):
        named = raw
    elif input_name is not None:
        named = {input_name: raw}
    elif len(declared) == 1:
        named = {next(iter(declared)): raw}
    else:
        raise UsageError(
            f"model {metadata.name!r} has inputs {', '.join(declared)}: pass --input NAME or a JSON object"
        )
    inputs: dict[str, np.ndarray] = {}
    for name, value in named.items():
        tensor = declared.get(name)
        if tensor is None:
            raise UsageError(f"model {metadata.name!r} has no input {name!r}; inputs: {', '.join(declared)}")
        try:
            array = np.asarray(value, dtype=to_numpy_dtype(tensor.datatype))
        except (TypeError, ValueError) as error:
            raise UsageError(f"input {name!r}: cannot convert to {tensor.datatype}: {error}") from None
        if array.ndim == len(tensor.shape) - 1:
            array = array[np.newaxis]
        inputs[name] = array
    return inputs


def _as_json(result: InferResult) -> dict[str, Any]:
    return {
        "model_name": result.model_name,
        "model_version": result.model_version,
        "id": result.id,
        "outputs": {
            name: {"datatype": to_datatype(array.dtype), "shape": list(array.shape), "data": _json_values(array)}
            for name, array in result.outputs.items()
        },
    }


def _json_values(array: np.ndarray) -> Any:
    """Nested lists; FP16/FP32 values printed at their own precision (0.1, not 0.10000000149011612)."""
    if array.dtype == object:
        flat: list[Any] = [x.decode(errors="replace") if isinstance(x, bytes) else x for x in array.ravel()]
    elif array.dtype.kind == "f" and array.dtype.itemsize < 8:
        flat = [float(str(value)) for value in array.ravel()]
    else:
        return array.tolist()
    nested = np.empty(len(flat), dtype=object)
    nested[:] = flat
    return nested.reshape(array.shape).tolist()


def _as_table(result: InferResult) -> str:
    """One table per output: a row per batch item, a column per element of the item."""
    sections = []
    for name, array in result.outputs.items():
        source = f"model {result.model_name} v{result.model_version}"
        title = f"{name}  {to_datatype(array.dtype)}  shape {list(array.shape)}  ({source})"
        matrix = array.reshape(1, -1) if array.ndim < 2 else array.reshape(array.shape[0], -1)
        headers = ["row", *(f"[{i}]" for i in range(matrix.shape[1]))]
        rows = [[index, *(_format_value(v) for v in row)] for index, row in enumerate(matrix)]
        sections.append(title + "\n" + format_table(headers, rows, right=[True] * len(headers)))
    return "\n\n".join(sections)


def _format_value(value: Any) -> str:
    if isinstance(value, np.floating):
        return f"{float(value):.6g}"
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)
