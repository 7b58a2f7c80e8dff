"""The builder: JSON network specs -> verified ONNX models in a model repository."""

from nnserve.builder.build import BuildResult, build
from nnserve.builder.spec import DenseLayer, NetworkSpec, SpecError, load_spec, parse_spec

__all__ = ["BuildResult", "DenseLayer", "NetworkSpec", "SpecError", "build", "load_spec", "parse_spec"]
