"""The protocol frontends: thin translations of a wire protocol onto `nnserve.server.dataplane.DataPlane`.

`grpc_servicer` speaks the KServe v2 gRPC service (and Triton's extensions); `status` holds the one table per
protocol that maps the core's domain errors to status codes. A new protocol is one new module here.
"""
