"""An independent numpy forward pass: the oracle the exported ONNX graph is checked against."""

from __future__ import annotations

import math

import numpy as np

from nnserve.builder.spec import NetworkSpec

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _erf(x: np.ndarray) -> np.ndarray:
    """Vectorised erf via math.erf; numpy has none and SciPy is not a dependency."""
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def activate(name: str, z: np.ndarray) -> np.ndarray:
    """Apply an activation along the last axis, in float64."""
    if name == "linear":
        return z
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free form of 1 / (1 + e^-z)
    if name == "tanh":
        return np.tanh(z)
    if name == "gelu":
        return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * z * (1.0 + np.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z**3)))
    if name == "softmax":
        shifted = np.exp(z - z.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)
    raise ValueError(f"unknown activation {name!r}")


def forward(spec: NetworkSpec, x: np.ndarray) -> np.ndarray:
    """Run the network on a (batch, input_size) array in float64."""
    h = np.asarray(x, dtype=np.float64)
    for layer in spec.layers:
        z = h @ layer.weights.astype(np.float64) + layer.bias.astype(np.float64)
        h = activate(layer.activation, z)
    return h
