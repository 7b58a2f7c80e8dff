"""The JSON network spec: parsing and validation into typed, immutable layers.

Every error names the file, the layer index and the field, with what was expected and what
was found, so a user can fix a spec without reading the builder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SPEC_FORMAT = "nnserve.network/v1"
ACTIVATIONS = ("linear", "relu", "sigmoid", "tanh", "gelu", "gelu_tanh", "softmax")
DTYPES = ("float32", "float16", "float64")
ROWS_ARE_NEURONS = "rows_are_neurons"
ROWS_ARE_INPUTS = "rows_are_inputs"
LAYOUTS = (ROWS_ARE_NEURONS, ROWS_ARE_INPUTS)
DEFAULT_LAYOUT = ROWS_ARE_NEURONS
MAX_NAME_LENGTH = 128

_TOP_KEYS = frozenset(
    {"format", "name", "description", "input_size", "input_name", "output_name", "dtype", "weight_layout", "layers"}
)
_LAYER_KEYS = frozenset({"name", "weights", "bias", "activation", "weight_layout"})


class SpecError(ValueError):
    """A network spec is invalid; the message says where and why."""

    def __init__(self, source: str, where: str, message: str) -> None:
        self.source = source
        self.where = where
        self.detail = message
        super().__init__(f"{source}: {where}: {message}" if where else f"{source}: {message}")


@dataclass(frozen=True)
class DenseLayer:
    """One dense layer, weights normalised to shape (inputs, outputs): y = act(x @ W + b)."""

    name: str
    weights: np.ndarray = field(repr=False)
    bias: np.ndarray = field(repr=False)
    activation: str

    @property
    def in_features(self) -> int:
        return int(self.weights.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.weights.shape[1])

    @property
    def parameter_count(self) -> int:
        return int(self.weights.size + self.bias.size)


@dataclass(frozen=True)
class NetworkSpec:
    """A validated network: a chain of dense layers with named input and output tensors."""

    name: str
    input_size: int
    layers: tuple[DenseLayer, ...]
    dtype: str = "float32"
    input_name: str = "input"
    output_name: str = "output"
    description: str = ""
    source: str = "<memory>"
    spec_sha256: str = ""

    @property
    def output_size(self) -> int:
        return self.layers[-1].out_features

    @property
    def parameter_count(self) -> int:
        return sum(layer.parameter_count for layer in self.layers)

    @property
    def flops_per_sample(self) -> int:
        """Multiply-adds count as two operations; activations are not counted."""
        return sum(2 * layer.weights.size + layer.bias.size for layer in self.layers)


def is_plain_name(name: str) -> bool:
    """A model or tensor name safe as a single path component and a metric label."""
    if not name or len(name) > MAX_NAME_LENGTH or name in {".", ".."}:
        return False
    return all(ch.isalnum() or ch in "_-." for ch in name) and not name.startswith(".")


def load_spec(path: str | Path) -> NetworkSpec:
    """Read and validate a JSON spec file; `.npy` weight references resolve beside it."""
    path = Path(path)
    source = str(path)
    try:
        raw_bytes = path.read_bytes()
    except OSError as exc:
        raise SpecError(source, "", f"cannot read the spec file ({exc.strerror})") from exc
    try:
        document = json.loads(raw_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(source, "", f"not valid JSON ({exc})") from exc
    return parse_spec(document, source=source, base_dir=path.parent, default_name=path.stem)


def parse_spec(
    document: Any,
    *,
    source: str = "<spec>",
    base_dir: Path | None = None,
    default_name: str | None = None,
) -> NetworkSpec:
    """Validate a decoded JSON document and return the network it describes."""
    if not isinstance(document, Mapping):
        raise SpecError(source, "", f"expected a JSON object at the top level, found {_kind(document)}")
    unknown = sorted(set(document) - _TOP_KEYS)
    if unknown:
        raise SpecError(source, f"field {unknown[0]!r}", f"unknown key; allowed keys: {sorted(_TOP_KEYS)}")
    fmt = document.get("format", SPEC_FORMAT)
    if fmt != SPEC_FORMAT:
        raise SpecError(source, "field 'format'", f"expected {SPEC_FORMAT!r}, found {fmt!r}")

    name = _get_str(document, "name", source, default=default_name)
    if name is None:
        raise SpecError(source, "field 'name'", "missing; give the network a name")
    if not is_plain_name(name):
        raise SpecError(source, "field 'name'", f"expected letters, digits, '_', '-' or '.', found {name!r}")
    dtype = _get_str(document, "dtype", source, default="float32")
    if dtype not in DTYPES:
        raise SpecError(source, "field 'dtype'", f"expected one of {list(DTYPES)}, found {dtype!r}")
    layout = _get_str(document, "weight_layout", source, default=None)
    if layout is not None and layout not in LAYOUTS:
        raise SpecError(source, "field 'weight_layout'", f"expected one of {list(LAYOUTS)}, found {layout!r}")
    input_name = _get_str(document, "input_name", source, default="input")
    output_name = _get_str(document, "output_name", source, default="output")
    for key, value in (("input_name", input_name), ("output_name", output_name)):
        if not is_plain_name(value):
            raise SpecError(source, f"field {key!r}", f"expected a plain tensor name, found {value!r}")
    if input_name == output_name:
        raise SpecError(source, "field 'output_name'", "must differ from 'input_name'")

    input_size = document.get("input_size")
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise SpecError(source, "field 'input_size'", f"expected a positive integer, found {input_size!r}")

    layers_doc = document.get("layers")
    if not isinstance(layers_doc, list) or not layers_doc:
        raise SpecError(source, "field 'layers'", f"expected a non-empty list of layers, found {_kind(layers_doc)}")

    layers: list[DenseLayer] = []
    width = input_size
    for index, layer_doc in enumerate(layers_doc):
        layer = _parse_layer(layer_doc, index, width, layout, source, base_dir)
        if dtype == "float64" and layer.activation == "gelu":
            raise SpecError(
                source,
                f"layer {index}, field 'activation'",
                "onnxruntime has no float64 kernel for exact gelu (Erf); use dtype float32 or activation gelu_tanh",
            )
        layers.append(layer)
        width = layer.out_features

    description = _get_str(document, "description", source, default="")
    return NetworkSpec(
        name=name,
        input_size=input_size,
        layers=tuple(layers),
        dtype=dtype,
        input_name=input_name,
        output_name=output_name,
        description=description,
        source=source,
        spec_sha256=spec_digest(layers, input_size, dtype, input_name, output_name),
    )


def spec_digest(layers: Sequence[DenseLayer], input_size: int, dtype: str, input_name: str, output_name: str) -> str:
    """A hash of what the network computes (not of its JSON formatting)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([input_size, dtype, input_name, output_name]).encode())
    for layer in layers:
        digest.update(layer.activation.encode())
        digest.update(np.ascontiguousarray(layer.weights, dtype=np.float64).tobytes())
        digest.update(np.ascontiguousarray(layer.bias, dtype=np.float64).tobytes())
    return digest.hexdigest()


def _parse_layer(
    doc: Any, index: int, in_features: int, default_layout: str | None, source: str, base_dir: Path | None
) -> DenseLayer:
    where = f"layer {index}"
    if not isinstance(doc, Mapping):
        raise SpecError(source, where, f"expected a JSON object, found {_kind(doc)}")
    unknown = sorted(set(doc) - _LAYER_KEYS)
    if unknown:
        raise SpecError(source, f"{where}, field {unknown[0]!r}", f"unknown key; allowed keys: {sorted(_LAYER_KEYS)}")
    layer_name = _get_str(doc, "name", source, default=f"dense_{index}", where=where)
    activation = _get_str(doc, "activation", source, default=None, where=where)
    if activation is None:
        raise SpecError(source, f"{where}, field 'activation'", f"missing; expected one of {list(ACTIVATIONS)}")
    if activation not in ACTIVATIONS:
        raise SpecError(
            source, f"{where}, field 'activation'", f"expected one of {list(ACTIVATIONS)}, found {activation!r}"
        )
    layout = _get_str(doc, "weight_layout", source, default=default_layout, where=where)
    if layout is None:
        layout = DEFAULT_LAYOUT
        layout_stated = False
    else:
        layout_stated = True
    if layout not in LAYOUTS:
        raise SpecError(source, f"{where}, field 'weight_layout'", f"expected one of {list(LAYOUTS)}, found {layout!r}")

    if "weights" not in doc:
        raise SpecError(source, f"{where}, field 'weights'", "missing")
    if "bias" not in doc:
        raise SpecError(source, f"{where}, field 'bias'", "missing; use zeros for a layer without bias")
    weights = _to_array(doc["weights"], f"{where}, field 'weights'", source, base_dir)
    bias = _to_array(doc["bias"], f"{where}, field 'bias'", source, base_dir)

    if not layout_stated and weights.ndim == 2 and weights.shape[0] == weights.shape[1] > 1:
        raise SpecError(
            source,
            f"{where}, field 'weight_layout'",
            f"the weights are square {weights.shape}, so rows could be neurons or inputs; "
            f'state "weight_layout": {ROWS_ARE_NEURONS!r} (y = x @ W.T + b) or {ROWS_ARE_INPUTS!r} (y = x @ W + b)',
        )
    weights = _normalise_weights(weights, layout, in_features, f"{where}, field 'weights'", source)
    out_features = weights.shape[1]
    bias = _normalise_bias(bias, out_features, f"{where}, field 'bias'", source)
    return DenseLayer(name=layer_name, weights=weights, bias=bias, activation=activation)


def _normalise_weights(w: np.ndarray, layout: str, in_features: int, where: str, source: str) -> np.ndarray:
    """Return weights as (inputs, outputs); a 1-D vector is one neuron."""
    if w.ndim == 1:
        if w.shape[0] != in_features:
            raise SpecError(
                source,
                where,
                f"a 1-D weight vector is one neuron and needs {in_features} values (one per input), found {w.shape[0]}",
            )
        return w.reshape(in_features, 1)
    if w.ndim != 2:
        raise SpecError(source, where, f"expected a 2-D matrix or a 1-D vector, found {w.ndim} dimensions {w.shape}")
    if layout == ROWS_ARE_NEURONS:
        expected_inputs = w.shape[1]
        matrix = w.T
        other = ROWS_ARE_INPUTS if w.shape[0] == in_features else None
        shape_hint = f"(neurons, {in_features})"
    else:
        expected_inputs = w.shape[0]
        matrix = w
        other = ROWS_ARE_NEURONS if w.shape[1] == in_features else None
        shape_hint = f"({in_features}, neurons)"
    if expected_inputs != in_features:
        hint = f"; the shape fits weight_layout {other!r}: set it if that is what you meant" if other else ""
        raise SpecError(
            source,
            where,
            f"with weight_layout {layout!r} the layer receives {in_features} inputs, "
            f"so weights must have shape {shape_hint}, found {w.shape}{hint}",
        )
    return np.ascontiguousarray(matrix)


def _normalise_bias(b: np.ndarray, out_features: int, where: str, source: str) -> np.ndarray:
    if b.ndim == 0:
        if out_features != 1:
            raise SpecError(
                source,
                where,
                f"a scalar bias fits one neuron only; this layer has {out_features} neurons, "
                f"give {out_features} values",
            )
        return b.reshape(1)
    if b.ndim != 1 or b.shape[0] != out_features:
        raise SpecError(source, where, f"expected {out_features} values (one per neuron), found shape {b.shape}")
    return b


def _to_array(value: Any, where: str, source: str, base_dir: Path | None) -> np.ndarray:
    if isinstance(value, Mapping):
        array = _load_npy(value, where, source, base_dir)
    else:
        array = _nested_list_to_array(value, where, source)
    if not np.all(np.isfinite(array)):
        bad = np.argwhere(~np.isfinite(array))[0]
        raise SpecError(
            source, where, f"expected finite numbers, found {array[tuple(bad)]} at index {tuple(int(i) for i in bad)}"
        )
    return array


def _load_npy(ref: Mapping[str, Any], where: str, source: str, base_dir: Path | None) -> np.ndarray:
    if set(ref) != {"npy"} or not isinstance(ref["npy"], str):
        raise SpecError(
            source, where, f'expected numbers or {{"npy": "file.npy"}}, found object with keys {sorted(ref)}'
        )
    if base_dir is None:
        raise SpecError(source, where, ".npy references need a spec read from a file")
    relative = Path(ref["npy"])
    if relative.is_absolute() or ".." in relative.parts:
        raise SpecError(source, where, f"the .npy path must be relative to the spec's folder, found {ref['npy']!r}")
    path = base_dir / relative
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise SpecError(source, where, f"cannot load {str(path)!r}: {exc}") from exc
    if array.dtype.kind not in "fiu":
        raise SpecError(source, where, f"expected a numeric array in {ref['npy']!r}, found dtype {array.dtype}")
    return np.asarray(array, dtype=np.float64 if array.dtype == np.float64 else np.float32)


def _nested_list_to_array(value: Any, where: str, source: str) -> np.ndarray:
    if _is_number(value):
        return np.asarray(float(value), dtype=np.float64)
    if not isinstance(value, list) or not value:
        raise SpecError(source, where, f"expected a number or a non-empty list of numbers, found {_kind(value)}")
    if all(_is_number(v) for v in value):
        return np.asarray(value, dtype=np.float64)
    rows: list[list[float]] = []
    for r, row in enumerate(value):
        if not isinstance(row, list) or not all(_is_number(v) for v in row):
            raise SpecError(source, f"{where}, row {r}", f"expected a list of numbers, found {_kind(row)}")
        if rows and len(row) != len(rows[0]):
            raise SpecError(
                source, f"{where}, row {r}", f"ragged rows: expected {len(rows[0])} values like row 0, found {len(row)}"
            )
        rows.append(row)
    if not rows[0]:
        raise SpecError(source, where, "expected non-empty rows")
    return np.asarray(rows, dtype=np.float64)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _get_str(doc: Mapping[str, Any], key: str, source: str, *, default: str | None, where: str = "") -> Any:
    value = doc.get(key, default)
    if value is not None and not isinstance(value, str):
        place = f"{where}, field {key!r}" if where else f"field {key!r}"
        raise SpecError(source, place, f"expected a string, found {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__
