"""Domain exceptions of the serving core.

The core raises these and never imports grpc; the servicer maps each class to one gRPC
status code in a single table. Messages are written for the person who sent the request.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class: a request could not be served; `str(exc)` is safe to send to the client."""


class ModelNotFoundError(ServingError):
    """The model (or the requested version) is not in the repository."""


class ModelNotReadyError(ServingError):
    """The model exists but is not loaded, failed to load, or is being unloaded."""


class InvalidInputError(ServingError):
    """The request is malformed: names, datatypes, shapes or contents do not fit the model."""


class QueueFullError(ServingError):
    """The model's queue is at its bound; the client should back off and retry."""


class OverBudgetError(QueueFullError):
    """The server's in-flight byte budget has no room for the request now (`--max-inflight-bytes`); like a full
    queue, the client should back off and retry."""


class RequestTooLargeError(ServingError):
    """The request alone needs more memory than the server's whole in-flight budget: it can never be accepted, so
    retrying it is pointless (the message says so)."""


class DeadlineExpiredError(ServingError):
    """The caller's deadline passed before the request could run; it was not executed."""


class RequestCancelledError(ServingError):
    """The caller cancelled while the request was queued; it was not executed."""


class ServerUnavailableError(ServingError):
    """The server is shutting down (draining) and accepts no new work."""


class RepositoryControlError(ServingError):
    """Repository load/unload was asked for while model control is not explicit."""


class ModelLoadError(ServingError):
    """A model could not be loaded; the message gives the reason without native stack dumps."""


class ExecutionError(ServingError):
    """onnxruntime failed to run a batch; the requests of that batch alone fail."""


class DeviceUnavailableError(ModelLoadError):
    """The requested execution device (CUDA) cannot be used in this process."""
