"""NetworkSpec -> a plain ONNX graph: Gemm per layer, then its activation op."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nnserve import __version__
from nnserve.builder.spec import DenseLayer, NetworkSpec

# onnxruntime 1.20+ loads these; onnx 1.23 would otherwise write IR 14, which onnxruntime 1.31 refuses.
OPSET = 21
IR_VERSION = 10
BATCH_DIM = "batch"

_ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "float64": TensorProto.DOUBLE}
_NUMPY_DTYPES: dict[str, type[np.floating]] = {"float32": np.float32, "float16": np.float16, "float64": np.float64}
_SIMPLE_OPS = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh"}


def numpy_dtype(dtype: str) -> type[np.floating]:
    return _NUMPY_DTYPES[dtype]


def export_onnx(spec: NetworkSpec, *, dtype: str | None = None) -> onnx.ModelProto:
    """Build the ONNX model; `dtype` overrides the spec's (e.g. "float16" for GPU serving)."""
    dtype = dtype or spec.dtype
    elem_type = _ONNX_DTYPES[dtype]
    np_dtype = _NUMPY_DTYPES[dtype]
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    current = spec.input_name
    for index, layer in enumerate(spec.layers):
        last = index == len(spec.layers) - 1
        out_name = spec.output_name if last else f"{layer.name}_out"
        layer_nodes, layer_inits = _layer_nodes(layer, current, out_name, np_dtype)
        nodes.extend(layer_nodes)
        initializers.extend(layer_inits)
        current = out_name

    graph = helper.make_graph(
        nodes,
        spec.name,
        inputs=[helper.make_tensor_value_info(spec.input_name, elem_type, [BATCH_DIM, spec.input_size])],
        outputs=[helper.make_tensor_value_info(spec.output_name, elem_type, [BATCH_DIM, spec.output_size])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="nnserve",
        producer_version=__version__,
        ir_version=IR_VERSION,
        doc_string=spec.description,
    )
    helper.set_model_props(model, model_facts(spec, dtype))
    return model


def model_facts(spec: NetworkSpec, dtype: str) -> dict[str, str]:
    """metadata_props the server reads back: size, cost and provenance of the network."""
    itemsize = np.dtype(_NUMPY_DTYPES[dtype]).itemsize
    layers = [
        {
            "name": layer.name,
            "in": layer.in_features,
            "out": layer.out_features,
            "activation": layer.activation,
            "parameters": layer.parameter_count,
        }
        for layer in spec.layers
    ]
    return {
        "nnserve.parameter_count": str(spec.parameter_count),
        "nnserve.weight_bytes": str(spec.parameter_count * itemsize),
        "nnserve.flops_per_sample": str(spec.flops_per_sample),
        "nnserve.spec_sha256": spec.spec_sha256,
        "nnserve.builder_version": __version__,
        "nnserve.dtype": dtype,
        "nnserve.layers": json.dumps(layers, separators=(",", ":")),
    }


def _layer_nodes(
    layer: DenseLayer, x: str, out: str, np_dtype: type[np.floating]
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    w_name, b_name = f"{layer.name}.weight", f"{layer.name}.bias"
    # Stored as (out, in) with transB=1, the layout of PyTorch's nn.Linear and of the exporters.
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(layer.weights.T, dtype=np_dtype), w_name),
        numpy_helper.from_array(layer.bias.astype(np_dtype), b_name),
    ]
    if layer.activation == "linear":
        return [helper.make_node("Gemm", [x, w_name, b_name], [out], name=f"{layer.name}.gemm", transB=1)], inits
    pre = f"{layer.name}_pre"
    gemm = helper.make_node("Gemm", [x, w_name, b_name], [pre], name=f"{layer.name}.gemm", transB=1)
    return [gemm, _activation_node(layer, pre, out)], inits


def _activation_node(layer: DenseLayer, x: str, out: str) -> onnx.NodeProto:
    node_name = f"{layer.name}.{layer.activation}"
    if layer.activation in _SIMPLE_OPS:
        return helper.make_node(_SIMPLE_OPS[layer.activation], [x], [out], name=node_name)
    if layer.activation == "softmax":
        return helper.make_node("Softmax", [x], [out], name=node_name, axis=-1)
    if layer.activation == "gelu":
        return helper.make_node("Gelu", [x], [out], name=node_name, approximate="none")
    if layer.activation == "gelu_tanh":
        return helper.make_node("Gelu", [x], [out], name=node_name, approximate="tanh")
    raise ValueError(f"unknown activation {layer.activation!r}")
