"""The JSON network spec: parsing and validation into typed, immutable layers.

Every error names the file, the layer index and the field, with what was expected and what
was found, so a user can fix a spec without reading the builder. Every independent error of
a spec is reported at once (a user should not fix a file one complaint per run); checks that
depend on an earlier one (a shape check needs the weights to parse) are skipped when it fails.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
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
# Element-level problems reported per field before the rest are counted: a matrix of strings
# should not print a million lines.
MAX_PROBLEMS_PER_FIELD = 5

_TOP_KEYS = frozenset(
    {"format", "name", "description", "input_size", "input_name", "output_name", "dtype", "weight_layout", "layers"}
)
_LAYER_KEYS = frozenset({"name", "weights", "bias", "activation", "weight_layout"})
_INVALID = "\0invalid"  # a layout that was given but is not one of LAYOUTS: shape checks cannot run


class SpecError(ValueError):
    """A network spec is invalid; `problems` holds every independent error found (just this one when alone)."""

    def __init__(self, source: str, where: str, message: str) -> None:
        self.source = source
        self.where = where
        self.detail = message
        self.problems: tuple[SpecError, ...] = (self,)
        super().__init__(self.line)

    @property
    def line(self) -> str:
        """This problem alone: `file: layer 0, field 'weights': what was expected, found what`."""
        return f"{self.source}: {self.where}: {self.detail}" if self.where else f"{self.source}: {self.detail}"

    @classmethod
    def combine(cls, errors: Sequence[SpecError]) -> SpecError:
        """One exception carrying every problem of `errors` (of one spec or of several), in order."""
        problems = tuple(problem for error in errors for problem in error.problems)
        if len(problems) == 1:
            return problems[0]
        combined = cls(problems[0].source, problems[0].where, problems[0].detail)
        combined.problems = problems
        combined.args = (str(combined),)
        return combined

    def __str__(self) -> str:
        return "\n".join(problem.line for problem in self.problems)


class _Problems:
    """The errors found so far in one spec, so validation can go on past the first."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.found: list[SpecError] = []

    def add(self, where: str, message: str) -> None:
        self.found.append(SpecError(self.source, where, message))

    def add_capped(self, where: str, items: Sequence[tuple[str, str]]) -> None:
        """Element-level problems of one field: the first few, then how many more there are."""
        for place, message in items[:MAX_PROBLEMS_PER_FIELD]:
            self.add(place, message)
        if len(items) > MAX_PROBLEMS_PER_FIELD:
            self.add(where, f"{len(items) - MAX_PROBLEMS_PER_FIELD} more problems like the ones above")


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

    def with_dtype(self, dtype: str) -> NetworkSpec:
        """The same network stored as `dtype` (what `--fp16` builds), so the summary, the export, the verification
        and the spec hash (which covers the dtype, as for a spec that states it) all agree on what is stored."""
        if dtype == self.dtype:
            return self
        if dtype not in DTYPES:
            raise SpecError(self.source, "dtype", f"expected one of {list(DTYPES)}, found {dtype!r}")
        if dtype == "float64" and any(layer.activation == "gelu" for layer in self.layers):
            raise SpecError(self.source, "dtype", "onnxruntime has no float64 kernel for exact gelu (Erf)")
        digest = spec_digest(self.layers, self.input_size, dtype, self.input_name, self.output_name)
        return replace(self, dtype=dtype, spec_sha256=digest)


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
    """Validate a decoded JSON document and return the network it describes; SpecError lists every problem."""
    if not isinstance(document, Mapping):
        raise SpecError(source, "", f"expected a JSON object at the top level, found {_kind(document)}")
    problems = _Problems(source)
    for key in sorted(set(document) - _TOP_KEYS):
        problems.add(f"field {key!r}", f"unknown key; allowed keys: {sorted(_TOP_KEYS)}")
    fmt = document.get("format", SPEC_FORMAT)
    if fmt != SPEC_FORMAT:
        problems.add("field 'format'", f"expected {SPEC_FORMAT!r}, found {fmt!r}")

    name = _text(document, "name", default_name, problems)
    if name is None and document.get("name") is None:
        problems.add("field 'name'", "required but missing: the network's name")
    elif name is not None and not is_plain_name(name):
        problems.add("field 'name'", f"expected letters, digits, '_', '-' or '.', found {name!r}")
    dtype = _choice(document, "dtype", DTYPES, "float32", problems)
    layout = _choice(document, "weight_layout", LAYOUTS, None, problems)
    if layout is None and document.get("weight_layout") is not None:
        layout = _INVALID
    input_name = _tensor_name(document, "input_name", "input", problems)
    output_name = _tensor_name(document, "output_name", "output", problems)
    if input_name is not None and input_name == output_name:
        problems.add("field 'output_name'", "must differ from 'input_name'")
    input_size = _input_size(document, problems)
    description = _text(document, "description", "", problems)

    layers: list[DenseLayer] = []
    layers_doc = document.get("layers")
    if layers_doc is None:
        problems.add("field 'layers'", "required but missing: a non-empty list of layers")
    elif not isinstance(layers_doc, list) or not layers_doc:
        problems.add("field 'layers'", f"expected a non-empty list of layers, found {_kind(layers_doc)}")
    else:
        width = input_size
        for index, layer_doc in enumerate(layers_doc):
            layer, width = _parse_layer(layer_doc, index, width, layout, dtype, problems, base_dir)
            if layer is not None:
                layers.append(layer)

    # A None below always comes with a recorded problem; testing both narrows the types.
    if (
        problems.found
        or name is None
        or dtype is None
        or input_size is None
        or input_name is None
        or output_name is None
        or description is None
    ):
        raise SpecError.combine(problems.found)
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


def _input_size(document: Mapping[str, Any], problems: _Problems) -> int | None:
    value = document.get("input_size")
    if value is None:
        problems.add("field 'input_size'", "required but missing: the number of input features (a positive integer)")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.add("field 'input_size'", f"expected a positive integer (input features), found {_kind(value)}")
        return None
    return value


def _tensor_name(document: Mapping[str, Any], key: str, default: str, problems: _Problems) -> str | None:
    value = _text(document, key, default, problems)
    if value is not None and not is_plain_name(value):
        problems.add(f"field {key!r}", f"expected a plain tensor name, found {value!r}")
        return None
    return value


def _parse_layer(
    doc: Any,
    index: int,
    in_features: int | None,
    default_layout: str | None,
    dtype: str | None,
    problems: _Problems,
    base_dir: Path | None,
) -> tuple[DenseLayer | None, int | None]:
    """The layer (None when it has a problem) and its output width (None when unknown, so the next layer's shape
    is not checked against a guess)."""
    where = f"layer {index}"
    if not isinstance(doc, Mapping):
        problems.add(where, f"expected a JSON object, found {_kind(doc)}")
        return None, None
    before = len(problems.found)
    for key in sorted(set(doc) - _LAYER_KEYS):
        problems.add(f"{where}, field {key!r}", f"unknown key; allowed keys: {sorted(_LAYER_KEYS)}")
    layer_name = _text(doc, "name", f"dense_{index}", problems, where)
    activation = _activation(doc, where, dtype, problems)
    layout: str | None
    if "weight_layout" in doc and doc["weight_layout"] is not None:
        layout = _choice(doc, "weight_layout", LAYOUTS, None, problems, where) or _INVALID
    else:
        layout = default_layout
    weights = _array_field(doc, "weights", where, problems, base_dir)
    bias = _array_field(doc, "bias", where, problems, base_dir)

    matrix = None
    if weights is not None and layout != _INVALID:
        if layout is None and weights.ndim == 2 and weights.shape[0] == weights.shape[1] > 1:
            problems.add(
                f"{where}, field 'weight_layout'",
                f"the weights are square {weights.shape}, so rows could be neurons or inputs; "
                f'state "weight_layout": {ROWS_ARE_NEURONS!r} (y = x @ W.T + b) or {ROWS_ARE_INPUTS!r} (y = x @ W + b)',
            )
        elif in_features is not None:
            matrix = _normalise_weights(weights, layout or DEFAULT_LAYOUT, in_features, f"{where}, field 'weights'",
                                        problems)
    out_features = int(matrix.shape[1]) if matrix is not None else None
    if bias is not None and out_features is not None:
        bias = _normalise_bias(bias, out_features, f"{where}, field 'bias'", problems)
    if len(problems.found) > before or matrix is None or bias is None or layer_name is None or activation is None:
        return None, out_features
    return DenseLayer(name=layer_name, weights=matrix, bias=bias, activation=activation), out_features


def _activation(doc: Mapping[str, Any], where: str, dtype: str | None, problems: _Problems) -> str | None:
    place = f"{where}, field 'activation'"
    activation = _text(doc, "activation", None, problems, where)
    if activation is None:
        if doc.get("activation") is None:
            problems.add(place, f"required but missing: one of {list(ACTIVATIONS)}")
        return None
    if activation not in ACTIVATIONS:
        problems.add(place, f"expected one of {list(ACTIVATIONS)}, found {activation!r}")
        return None
    if dtype == "float64" and activation == "gelu":
        problems.add(
            place, "onnxruntime has no float64 kernel for exact gelu (Erf); use dtype float32 or activation gelu_tanh"
        )
        return None
    return activation


def _normalise_weights(
    w: np.ndarray, layout: str, in_features: int, place: str, problems: _Problems
) -> np.ndarray | None:
    """Return weights as (inputs, outputs); a 1-D vector is one neuron."""
    if w.ndim == 1:
        if w.shape[0] != in_features:
            problems.add(
                place,
                f"a 1-D weight vector is one neuron and needs {in_features} values (one per input), found {w.shape[0]}",
            )
            return None
        return w.reshape(in_features, 1)
    if w.ndim != 2:
        problems.add(place, f"expected a 2-D matrix or a 1-D vector, found {w.ndim} dimensions {w.shape}")
        return None
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
        problems.add(
            place,
            f"with weight_layout {layout!r} the layer receives {in_features} inputs, "
            f"so weights must have shape {shape_hint}, found {w.shape}{hint}",
        )
        return None
    return np.ascontiguousarray(matrix)


def _normalise_bias(b: np.ndarray, out_features: int, where: str, problems: _Problems) -> np.ndarray | None:
    if b.ndim == 0:
        if out_features != 1:
            problems.add(
                where,
                f"a scalar bias fits one neuron only; this layer has {out_features} neurons, "
                f"give {out_features} values",
            )
            return None
        return b.reshape(1)
    if b.ndim != 1 or b.shape[0] != out_features:
        values = "1 value" if out_features == 1 else f"{out_features} values"
        problems.add(where, f"expected {values} (one per neuron), found shape {b.shape}")
        return None
    return b


_REQUIRED_ARRAYS = {
    "weights": 'a matrix, a 1-D vector (one neuron) or {"npy": "file.npy"}',
    "bias": "one value per neuron (zeros for a layer without bias)",
}


def _array_field(
    doc: Mapping[str, Any], key: str, where: str, problems: _Problems, base_dir: Path | None
) -> np.ndarray | None:
    place = f"{where}, field {key!r}"
    if key not in doc:
        problems.add(place, f"required but missing: {_REQUIRED_ARRAYS[key]}")
        return None
    value = doc[key]
    if isinstance(value, Mapping):
        array = _load_npy(value, place, problems, base_dir)
    else:
        array = _nested_list_to_array(value, place, problems)
    if array is None:
        return None
    finite = np.isfinite(array)
    if not np.all(finite):
        bad = np.argwhere(~finite)
        index = tuple(int(i) for i in bad[0])
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        problems.add(place, f"expected finite numbers, found {array[index]} at index {index}{more}")
        return None
    return array


def _load_npy(ref: Mapping[str, Any], where: str, problems: _Problems, base_dir: Path | None) -> np.ndarray | None:
    if set(ref) != {"npy"} or not isinstance(ref["npy"], str):
        problems.add(where, f'expected numbers or {{"npy": "file.npy"}}, found an object with keys {sorted(ref)}')
        return None
    if base_dir is None:
        problems.add(where, ".npy references need a spec read from a file")
        return None
    relative = Path(ref["npy"])
    if relative.is_absolute() or ".." in relative.parts:
        problems.add(where, f"the .npy path must be relative to the spec's folder, found {ref['npy']!r}")
        return None
    path = base_dir / relative
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError) as exc:
        problems.add(where, f"cannot load {str(path)!r}: {exc}")
        return None
    if array.dtype.kind not in "fiu":
        problems.add(where, f"expected a numeric array in {ref['npy']!r}, found dtype {array.dtype}")
        return None
    return np.asarray(array, dtype=np.float64 if array.dtype == np.float64 else np.float32)


def _nested_list_to_array(value: Any, where: str, problems: _Problems) -> np.ndarray | None:
    """A number, a 1-D vector of numbers or a matrix (a list of equally long rows of numbers)."""
    if _is_number(value):
        return np.asarray(float(value), dtype=np.float64)
    if not isinstance(value, list) or not value:
        problems.add(where, f"expected a number, a list of numbers or a list of rows, found {_kind(value)}")
        return None
    if not any(isinstance(item, list) for item in value):  # a 1-D vector
        bad = [(f"{where}, element {i}", f"expected a number, found {_kind(v)}") for i, v in enumerate(value)
               if not _is_number(v)]
        if bad:
            problems.add_capped(where, bad)
            return None
        return np.asarray(value, dtype=np.float64)
    found: list[tuple[str, str]] = []
    reference: tuple[int, int] | None = None  # (row index, length) of the first row, for the ragged check
    for r, row in enumerate(value):
        place = f"{where}, row {r}"
        if not isinstance(row, list):
            found.append((place, f"expected a row (a list of numbers) like the other rows, found {_kind(row)}"))
            continue
        if not row:
            found.append((place, "expected a non-empty row of numbers, found an empty list"))
            continue
        found.extend((f"{place}, element {c}", f"expected a number, found {_kind(v)}")
                     for c, v in enumerate(row) if not _is_number(v))
        if reference is None:
            reference = (r, len(row))
        elif len(row) != reference[1]:
            found.append(
                (place, f"ragged rows: expected {reference[1]} values like row {reference[0]}, found {len(row)}")
            )
    if found:
        problems.add_capped(where, found)
        return None
    return np.asarray(value, dtype=np.float64)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _text(doc: Mapping[str, Any], key: str, default: str | None, problems: _Problems, where: str = "") -> str | None:
    """The string at `key`, `default` when absent; None (and a problem) when it is there but not a string."""
    value = doc.get(key)
    if value is None:
        return default
    if isinstance(value, str):
        return value
    problems.add(f"{where}, field {key!r}" if where else f"field {key!r}", f"expected a string, found {_kind(value)}")
    return None


def _choice(
    doc: Mapping[str, Any], key: str, allowed: Sequence[str], default: str | None, problems: _Problems, where: str = ""
) -> str | None:
    """One of `allowed` (or `default` when absent); None, with a problem recorded, for anything else."""
    value = _text(doc, key, default, problems, where)
    if value is not None and value not in allowed:
        problems.add(f"{where}, field {key!r}" if where else f"field {key!r}",
                     f"expected one of {list(allowed)}, found {value!r}")
        return None
    return value


def _kind(value: Any) -> str:
    """A found value as the user wrote it in JSON, for "expected ..., found ..." messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:40] + "..."
        return f"a string ({json.dumps(shown)})"
    if isinstance(value, list):
        return "an empty list" if not value else f"a list of {len(value)} items"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__
