"""Generated protobuf/gRPC modules for the KServe v2 / Open Inference Protocol service."""
