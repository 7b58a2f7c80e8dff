"""Request bytes that are not a valid message of the method's request type get INVALID_ARGUMENT on every service
(inference, health, reflection), with or without token authentication, and the server goes on serving.

The guard is applied once, when the services register (`nnserve.server.decode_guard`), not by an interceptor: these
tests hold it to that on a server without tokens (no interceptor at all) and on one with tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from nnserve.protos import grpc_service_pb2 as pb
from nnserve.protos import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import DENSE_B, DENSE_W, dense_model, dense_reference, infer_request, running_server, write_model

TOKEN = "guard-admin-token-0123456789abcdef"
# A length-delimited field 1 that claims 100 bytes and carries 1: no protobuf message parses from it.
TRUNCATED = b"\x0a\x64\x01"
UNARY_METHODS = (
    "/inference.GRPCInferenceService/ModelInfer",
    "/inference.GRPCInferenceService/ModelMetadata",
    "/grpc.health.v1.Health/Check",
)
STREAM_METHODS = (
    "/inference.GRPCInferenceService/ModelStreamInfer",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
)


@pytest.fixture(scope="module", params=["no tokens", "tokens"])
def guarded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, tuple]]:
    repo = tmp_path_factory.mktemp("guard")
    write_model(repo, "dense", dense_model(DENSE_W, DENSE_B), config={"max_batch_size": 8})
    overrides = {"auth_tokens": f"{TOKEN} *"} if request.param == "tokens" else {}
    metadata = (("authorization", f"Bearer {TOKEN}"),) if request.param == "tokens" else ()
    with running_server(repo, **overrides) as running:
        yield running.address, metadata


@pytest.mark.parametrize("method", UNARY_METHODS + STREAM_METHODS)
def test_undecodable_requests_get_invalid_argument_on_every_service(guarded: tuple[str, tuple], method: str) -> None:
    address, metadata = guarded

    def send(channel: grpc.Channel) -> object:
        if method in STREAM_METHODS:
            call = channel.stream_stream(method, request_serializer=None, response_deserializer=None)
            return list(call(iter([TRUNCATED]), timeout=10, metadata=metadata))
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        return call(TRUNCATED, timeout=10, metadata=metadata)

    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as caught:
        send(channel)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert "not a valid protobuf message" in (caught.value.details() or "")


def test_the_server_still_answers_correctly_after_undecodable_requests(guarded: tuple[str, tuple]) -> None:
    address, metadata = guarded
    x = np.array([[0.5, -1.0, 2.0]], dtype=np.float32)
    with grpc.insecure_channel(address) as channel:
        raw_infer = channel.unary_unary(UNARY_METHODS[0], request_serializer=None, response_deserializer=None)
        for _ in range(3):
            with pytest.raises(grpc.RpcError):
                raw_infer(TRUNCATED, timeout=10, metadata=metadata)
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            infer_request("dense", {"input": x}), timeout=10, metadata=metadata
        )
    assert isinstance(response, pb.ModelInferResponse)
    got = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(1, -1)
    np.testing.assert_allclose(got, dense_reference(x), rtol=1e-6, atol=1e-6)


def test_reflection_lists_the_services_through_the_guarded_registration(guarded: tuple[str, tuple]) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    address, metadata = guarded
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10, metadata=metadata
        ))
    names = {service.name for service in replies[0].list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names

