"""One loaded model version: its onnxruntime session, signature, facts and a thread-safe `run`.

`run` is what an executor (the dynamic batcher, or direct execution) calls from a worker
thread: onnxruntime's `run` releases the GIL and may be called concurrently. Native error
text is logged here and replaced by a short message before it can reach a client.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from nnserve.server import cpu_quota
from nnserve.server.errors import DeviceUnavailableError, ExecutionError, ModelLoadError
from nnserve.server.model_facts import provider_fallback_reason, read_model_header
from nnserve.server.providers import CUDA, create_session, session_options
from nnserve.server.tensors import ORT_DATATYPES, Signature, TensorSpec

log = logging.getLogger(__name__)

MODEL_FILENAME = "model.onnx"
PLATFORM = "onnxruntime_onnx"
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
_ABSOLUTE_DIRS = re.compile(r"(?<![^\s'\"(\[=:])(?:/[^\s/:'\"]+)+/(?=[^\s/:'\"])")
"""The folders of an absolute path that starts a word (or follows a colon, as in onnxruntime's
`failed:/onnxruntime_src/...`): `/srv/models/a/1/model.onnx` -> `model.onnx`. Only whole paths: a relative path
(`repo/a/1/model.onnx`) keeps every separator."""


@dataclass(frozen=True)
class ModelFacts:
    """Size and provenance of a network, from the builder's metadata_props or counted from the graph."""

    parameter_count: int
    weight_bytes: int
    flops_per_sample: int | None = None
    spec_sha256: str = ""
    builder_version: str = ""
    layers: tuple[dict[str, Any], ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    opset: int | None = None
    """The default (ai.onnx) domain's opset the graph imports."""
    ir_version: int | None = None
    dtype: str = ""
    """The builder's dtype (float32, float16, float64); empty for models it did not build."""


@dataclass(frozen=True)
class RunnerOptions:
    """How a version's session is created (the model config merged over the server's defaults)."""

    device: str = "auto"
    device_id: int = 0
    intra_op_threads: int = 0
    """0: every CPU the container's quota allows (`cpu_quota.intra_op_threads`), not onnxruntime's host-core count."""
    inter_op_threads: int = 0
    graph_optimization_level: str = "all"
    max_batch_size: int | None = None
    """None: the default below when the model has a dynamic batch dimension, else 0."""
    default_max_batch_size: int = 64
    intra_op_spinning: bool = False
    """Let onnxruntime's intra-op threads busy-wait for work after a run (its default). Off here: a spinning pool
    burns the CPU that the event loop (and, on small machines, the clients) need between batches."""
    io_binding: bool | None = None
    """None: bind outputs to preallocated host buffers on CUDA only; True/False force it (tests use True on CPU)."""


class ModelRunner:
    """A model version ready to run; immutable after construction except for the session's own state."""

    def __init__(
        self,
        name: str,
        version: int,
        path: Path,
        session: ort.InferenceSession,
        provider: str,
        options: RunnerOptions,
    ) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.provider = provider
        self.device_id = options.device_id
        self._session = session
        inputs = tuple(_tensor_spec(arg, name, "input") for arg in session.get_inputs())
        outputs = tuple(_tensor_spec(arg, name, "output") for arg in session.get_outputs())
        max_batch_size = _max_batch_size(name, inputs, outputs, options)
        self.signature = Signature(name, inputs, outputs, max_batch_size)
        self.facts = _facts(session, path)
        self.requested_device = options.device
        self.provider_fallback = provider_fallback_reason(options.device, provider, options.device_id)
        """Why a model that could have had CUDA runs on another provider; "" when there is no fallback."""
        self._output_names = list(self.signature.output_names)
        use_binding = options.io_binding if options.io_binding is not None else provider == CUDA
        # Strings cannot be bound to preallocated buffers; onnxruntime runs string kernels on the CPU anyway.
        has_strings = any(t.datatype == "BYTES" for t in (*inputs, *outputs))
        self._use_io_binding = use_binding and not has_strings
        # onnxruntime prints execution errors to stderr itself, quoting input values; the server logs
        # its own line instead (below), so the native logger stays silent at run time.
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4
        self._device_type = "cuda" if provider == CUDA else "cpu"

    @classmethod
    def load(cls, name: str, version: int, path: Path, options: RunnerOptions) -> ModelRunner:
        """Create the session; ModelLoadError (or DeviceUnavailableError) with a clean reason on failure."""
        so = session_options(
            intra_op_threads=options.intra_op_threads or cpu_quota.intra_op_threads(),
            inter_op_threads=options.inter_op_threads,
            optimization_level=options.graph_optimization_level,
        )
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.intra_op_spinning else "0")
        label = f"'{name}' version {version}"
        try:
            session, provider = create_session(
                path, device=options.device, device_id=options.device_id, options=so, model_label=label
            )
        except DeviceUnavailableError:
            raise
        except Exception as exc:
            log.debug("onnxruntime failed to load %s", path, exc_info=True)
            shown = f"{name}/{version}/{path.name}"
            raise ModelLoadError(f"{shown}: {_clean_ort_error(exc, path, shown)}") from None
        runner = cls(name, version, path, session, provider, options)
        if runner.provider_fallback:
            # One warning line per process already gives the reason; this marks each model it affects.
            log.info("model %s: CPU fallback, runs on %s although device '%s' could have used the GPU",
                     label, provider, options.device)
        return runner

    @property
    def batched(self) -> bool:
        return self.signature.max_batch_size > 0

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Execute the session on already validated inputs; ExecutionError with a clean message on failure."""
        try:
            if self._use_io_binding:
                return self._run_bound(inputs)
            values = self._session.run(self._output_names, inputs, self._run_options)
        except Exception as exc:
            rows = next(iter(inputs.values())).shape[0] if inputs else 0
            # The error text can quote request values (e.g. an index out of range): the client gets it in its
            # status message; the log at the default level gets only where it failed.
            log.error("model '%s' version %d failed on a batch of %d rows (%s)", self.name, self.version, rows,
                      _error_kind(exc))
            log.debug("model '%s' version %d failure: %s", self.name, self.version, exc)
            raise ExecutionError(
                f"model '{self.name}' version {self.version} failed to execute "
                f"({_clean_ort_error(exc)}); see the server log"
            ) from None
        return dict(zip(self._output_names, values, strict=True))

    def _run_bound(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run with I/O binding: onnxruntime writes outputs straight into preallocated host arrays.

        On CUDA this saves the intermediate host copy of each output; outputs whose shape is
        not known before running are bound by device and copied out afterwards.
        """
        binding = self._session.io_binding()
        for name, array in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        rows = next(iter(inputs.values())).shape[0] if self.batched else 0
        preallocated: dict[str, np.ndarray] = {}
        for spec in self.signature.outputs:
            shape = (rows, *spec.shape[1:]) if self.batched else spec.shape
            if all(d >= 0 for d in shape):
                out = np.empty(shape, dtype=spec.dtype)
                binding.bind_output(spec.name, "cpu", 0, spec.dtype, list(shape), out.ctypes.data)
                preallocated[spec.name] = out
            else:
                binding.bind_output(spec.name, "cpu")
        self._session.run_with_iobinding(binding, self._run_options)
        if len(preallocated) == len(self._output_names):
            return preallocated
        copied = binding.copy_outputs_to_cpu()
        return {
            name: preallocated.get(name, value) for name, value in zip(self._output_names, copied, strict=True)
        }


def _tensor_spec(arg: Any, model: str, kind: str) -> TensorSpec:
    datatype = ORT_DATATYPES.get(arg.type)
    if datatype is None:
        raise ModelLoadError(
            f"model '{model}' {kind} '{arg.name}' has type {arg.type}, which nnserve does not serve "
            f"(supported: {', '.join(sorted(set(ORT_DATATYPES.values())))})"
        )
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(arg.name, datatype, shape)


def _max_batch_size(
    name: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], options: RunnerOptions
) -> int:
    """The configured batch limit, checked against the graph: batching needs a dynamic dimension 0 everywhere."""
    fixed = [t for t in (*inputs, *outputs) if not t.shape or t.shape[0] != -1]
    if options.max_batch_size is None:
        return 0 if fixed else options.default_max_batch_size
    if options.max_batch_size > 0 and fixed:
        bad = fixed[0]
        raise ModelLoadError(
            f"model '{name}': config.json sets max_batch_size {options.max_batch_size}, but tensor '{bad.name}' "
            f"has shape {list(bad.shape)} without a dynamic first (batch) dimension; set max_batch_size to 0"
        )
    return options.max_batch_size


def _facts(session: ort.InferenceSession, path: Path) -> ModelFacts:
    metadata = dict(session.get_modelmeta().custom_metadata_map)

    def number(key: str) -> int | None:
        try:
            return int(metadata[key])
        except (KeyError, ValueError):
            return None

    layers: tuple[dict[str, Any], ...] = ()
    try:
        parsed = json.loads(metadata.get("nnserve.layers", "[]"))
        if isinstance(parsed, list):
            layers = tuple(item for item in parsed if isinstance(item, dict))
    except ValueError:
        pass
    parameters, weight_bytes = number("nnserve.parameter_count"), number("nnserve.weight_bytes")
    if parameters is None or weight_bytes is None:
        parameters, weight_bytes = _count_initializers(path)
    header = read_model_header(path)
    return ModelFacts(
        parameter_count=parameters,
        weight_bytes=weight_bytes,
        flops_per_sample=number("nnserve.flops_per_sample"),
        spec_sha256=metadata.get("nnserve.spec_sha256", ""),
        builder_version=metadata.get("nnserve.builder_version", ""),
        layers=layers,
        metadata=metadata,
        opset=header.opset,
        ir_version=header.ir_version,
        dtype=metadata.get("nnserve.dtype", ""),
    )


def _count_initializers(path: Path) -> tuple[int, int]:
    """Parameters and their bytes, counted from the graph's initializers (models not made by the builder)."""
    import onnx
    from onnx import helper

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return 0, 0
    parameters = 0
    weight_bytes = 0
    for init in model.graph.initializer:
        count = int(np.prod(init.dims, dtype=np.int64)) if init.dims else 1
        parameters += count
        with contextlib.suppress(KeyError, TypeError, ValueError):
            weight_bytes += count * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
    return parameters, weight_bytes


def _clean_ort_error(exc: BaseException, path: Path | None = None, shown: str = "") -> str:
    """One readable line from an onnxruntime exception: no error-code prefix, and no server folders: the model's
    own file (`path`, as given or absolute) reads as `shown` (its place in the repository, `model/1/model.onnx`),
    any other absolute path as its file name."""
    kind = type(exc).__name__
    text = " ".join(str(exc).split())
    text = _ORT_PREFIX.sub("", text)
    if kind == "InvalidProtobuf" or "Protobuf parsing failed" in text:
        return "not a valid ONNX model file (protobuf parsing failed)"
    if kind == "NoSuchFile":
        return "model file not found"
    if path is not None and shown:
        for form in sorted({str(path), os.path.abspath(path), str(path.resolve())}, key=len, reverse=True):
            text = text.replace(form, shown)
    text = _ABSOLUTE_DIRS.sub("", text)
    if len(text) > 300:
        text = text[:297] + "..."
    return text or kind


def _error_kind(exc: Exception) -> str:
    """The part of an onnxruntime error that names no data: its status and the failing node, if given."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(". ", 1)[0][:200]
