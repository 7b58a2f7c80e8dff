"""nnserve: serve dense neural networks over the KServe v2 gRPC protocol."""

__version__ = "0.1.0"
