"""Large random MLPs for benchmarks: `1024x4096x4096x1024` -> relu hidden layers, linear output."""

from __future__ import annotations

import itertools

import numpy as np

from nnserve.builder.spec import DenseLayer, NetworkSpec, spec_digest


def parse_widths(text: str) -> list[int]:
    """'1024x4096x1024' -> [1024, 4096, 1024]; at least an input and an output width."""
    try:
        widths = [int(part) for part in text.lower().split("x")]
    except ValueError:
        raise ValueError(f"expected widths like 1024x4096x1024, found {text!r}") from None
    if len(widths) < 2 or any(w < 1 for w in widths):
        raise ValueError(f"expected at least two positive widths like 1024x4096x1024, found {text!r}")
    return widths


def random_mlp(widths: list[int], *, name: str, seed: int = 0, hidden_activation: str = "relu") -> NetworkSpec:
    """He-initialised weights, so activations keep their scale through deep stacks."""
    rng = np.random.default_rng(seed)
    layers = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        weights = rng.standard_normal((fan_in, fan_out), dtype=np.float32)
        weights *= np.float32(np.sqrt(2.0 / fan_in))
        bias = rng.standard_normal(fan_out, dtype=np.float32) * np.float32(0.01)
        last = index == len(widths) - 2
        layers.append(DenseLayer(f"dense_{index}", weights, bias, "linear" if last else hidden_activation))
    return NetworkSpec(
        name=name,
        input_size=widths[0],
        layers=tuple(layers),
        description=f"random MLP {'x'.join(map(str, widths))}, seed {seed}",
        source=f"--random {'x'.join(map(str, widths))} --seed {seed}",
        spec_sha256=spec_digest(layers, widths[0], "float32", "input", "output"),
    )
