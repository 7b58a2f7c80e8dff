"""Check an exported model in onnxruntime against the independent numpy forward pass."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from nnserve.builder.export import numpy_dtype
from nnserve.builder.reference import forward
from nnserve.builder.spec import NetworkSpec

# Relative tolerance by stored dtype; errors are measured against max(1, max |expected|).
_TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "float16": 2e-2}


class VerificationError(RuntimeError):
    """The ONNX model does not compute what the spec says (or onnxruntime cannot run it)."""


@dataclass(frozen=True)
class VerificationReport:
    samples: int
    max_abs_error: float
    tolerance: float


def verify_model(
    model_path: Path, spec: NetworkSpec, dtype: str, *, samples: int = 8, seed: int = 0
) -> VerificationReport:
    """Run `model_path` on random inputs and compare with numpy; raise VerificationError on mismatch."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, spec.input_size)).astype(numpy_dtype(dtype))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        (actual,) = session.run([spec.output_name], {spec.input_name: x})
    except Exception as exc:  # onnxruntime raises several native exception types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VerificationError(f"{spec.source}: onnxruntime could not run the exported model: {first_line}") from exc
    expected = forward(spec, x.astype(np.float64))
    scale = max(1.0, float(np.abs(expected).max()))
    error = float(np.abs(actual.astype(np.float64) - expected).max())
    tolerance = _TOLERANCE[dtype] * scale
    if not error <= tolerance:
        raise VerificationError(
            f"{spec.source}: the ONNX model differs from the numpy forward pass by {error:.3g} "
            f"(tolerance {tolerance:.3g} for {dtype})"
        )
    return VerificationReport(samples=samples, max_abs_error=error, tolerance=tolerance)
