"""A Keras-style summary of a network: layers, shapes, activations, parameter counts."""

from __future__ import annotations

from typing import Any

from nnserve.builder.spec import NetworkSpec


def summary_dict(spec: NetworkSpec) -> dict[str, Any]:
    """The summary as plain data (for --json)."""
    return {
        "name": spec.name,
        "source": spec.source,
        "dtype": spec.dtype,
        "input": {"name": spec.input_name, "shape": [None, spec.input_size]},
        "output": {"name": spec.output_name, "shape": [None, spec.output_size]},
        "layers": [
            {
                "name": layer.name,
                "input_shape": [None, layer.in_features],
                "output_shape": [None, layer.out_features],
                "activation": layer.activation,
                "parameters": layer.parameter_count,
            }
            for layer in spec.layers
        ],
        "total_parameters": spec.parameter_count,
        "flops_per_sample": spec.flops_per_sample,
        "weight_bytes": {"float32": spec.parameter_count * 4, "float16": spec.parameter_count * 2},
        "spec_sha256": spec.spec_sha256,
    }


def format_summary(spec: NetworkSpec) -> str:
    """The summary as a text table."""
    header = ("Layer", "Input -> Output", "Activation", "Params")
    rows = [
        (
            layer.name,
            f"(None, {layer.in_features}) -> (None, {layer.out_features})",
            layer.activation,
            f"{layer.parameter_count:,}",
        )
        for layer in spec.layers
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            cell.rjust(width) if i == 3 else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "-" * len(line(header))
    total = spec.parameter_count
    return "\n".join(
        [
            f'Model "{spec.name}" ({spec.dtype}, input "{spec.input_name}", output "{spec.output_name}")',
            rule,
            line(header),
            rule,
            *(line(r) for r in rows),
            rule,
            f"Total parameters: {total:,}",
            f"Weight memory: {human_bytes(total * 4)} (fp32), {human_bytes(total * 2)} (fp16)",
            f"FLOPs per sample: {spec.flops_per_sample:,}",
        ]
    )


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
