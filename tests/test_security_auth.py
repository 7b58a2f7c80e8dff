"""Token authentication: bearer tokens with scopes (infer, metadata, repository), health open to probes,
constant-time comparison, clear UNAUTHENTICATED / PERMISSION_DENIED messages, and tokens never in logs.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nnserve.client import AsyncInferenceClient, InferenceClient, InferenceError, RetryPolicy
from nnserve.client.retry import Attempts
from nnserve.protos import grpc_service_pb2 as pb
from nnserve.protos import grpc_service_pb2_grpc as pb_grpc
from nnserve.server import security
from nnserve.server.app import StartupError, create_server
from nnserve.server.security import SecurityConfigError, TokenTable, required_scope
from nnserve.server.settings import ServerSettings
from tests.conftest import (
    DENSE_B,
    DENSE_W,
    RunningServer,
    dense_model,
    dense_reference,
    infer_request,
    output_arrays,
    running_server,
    serve_command,
    start_server_process,
    write_model,
)

INFER_TOKEN = "infer-token-0123456789abcdef"
META_TOKEN = "metadata-token-0123456789abcdef"
REPO_TOKEN = "repository-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
TOKENS = (
    f"# token scopes name\n{INFER_TOKEN} infer app\n{META_TOKEN} metadata dashboards\n"
    f"{REPO_TOKEN} repository deployer\n{ADMIN_TOKEN} * ops\n"
)
X = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("auth")
    write_model(repo, "dense", dense_model(DENSE_W, DENSE_B), config={"max_batch_size": 8})
    # running_server waits on grpc.health.v1 without a token: starting at all shows health is open to probes.
    with running_server(repo, auth_tokens=TOKENS, model_control="explicit") as running:
        yield running


def code_of(call: object, request: object, metadata: object = ()) -> tuple[grpc.StatusCode, str]:
    try:
        call(request, timeout=30, metadata=metadata)  # type: ignore[operator]
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def test_calls_without_a_token_are_unauthenticated_while_grpc_health_stays_open(auth_server: RunningServer) -> None:
    stub = auth_server.stub()
    code, details = code_of(stub.ModelInfer, infer_request("dense", {"input": X}))
    assert code == UNAUTHENTICATED
    assert "authorization: Bearer <token>" in details
    assert code_of(stub.ServerLive, pb.ServerLiveRequest())[0] == UNAUTHENTICATED
    health = auth_server.health()
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service="dense"), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [
        ((("authorization", "Bearer not-a-configured-token-at-all"),), "not valid"),
        ((("authorization", f"Bearer {INFER_TOKEN}x"),), "not valid"),
        ((("authorization", f"Bearer {INFER_TOKEN[:-1]}"),), "not valid"),
        ((("authorization", f"Basic {INFER_TOKEN}"),), "must be 'Bearer <token>'"),
        ((("authorization", "Bearer"),), "must be 'Bearer <token>'"),
        ((("authorization", f"Bearer {INFER_TOKEN}"), ("authorization", f"Bearer {INFER_TOKEN}")), "exactly one"),
        ((("x-api-key", INFER_TOKEN),), "needs a token"),
    ],
)
def test_wrong_or_malformed_tokens_are_unauthenticated(
    auth_server: RunningServer, metadata: tuple[tuple[str, str], ...], fragment: str
) -> None:
    code, details = code_of(auth_server.stub().ModelInfer, infer_request("dense", {"input": X}), metadata)
    assert code == UNAUTHENTICATED
    assert fragment in details
    assert INFER_TOKEN not in details


def _reflection_list(channel: grpc.Channel, metadata: object) -> grpc.StatusCode:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    try:
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10, metadata=metadata
        )
        services = [s.name for r in responses for s in r.list_services_response.service]
    except grpc.RpcError as error:
        return error.code()
    assert "inference.GRPCInferenceService" in services
    return grpc.StatusCode.OK


def _stream_infer(stub: pb_grpc.GRPCInferenceServiceStub, metadata: object) -> grpc.StatusCode:
    try:
        responses = list(stub.ModelStreamInfer(iter([infer_request("dense", {"input": X})]), timeout=10,
                                               metadata=metadata))
    except grpc.RpcError as error:
        return error.code()
    assert responses[0].error_message == ""
    return grpc.StatusCode.OK


SCOPE_OF_CALL: dict[str, set[str]] = {  # the scopes that grant each call
    "ModelInfer": {"infer"},
    "ModelStreamInfer": {"infer"},
    "ServerLive": {"metadata", "infer"},
    "ModelMetadata": {"metadata", "infer"},
    "ModelConfig": {"metadata", "infer"},
    "ServerMetadata": {"metadata"},
    "ModelStatistics": {"metadata"},
    "RepositoryIndex": {"metadata"},
    "reflection": {"metadata"},
    "RepositoryModelLoad": {"repository"},
}
TOKEN_SCOPES = {INFER_TOKEN: {"infer"}, META_TOKEN: {"metadata"}, REPO_TOKEN: {"repository"},
                ADMIN_TOKEN: {"infer", "metadata", "repository"}}


@pytest.mark.parametrize("token", list(TOKEN_SCOPES))
def test_each_token_is_granted_exactly_the_rpcs_of_its_scopes(auth_server: RunningServer, token: str) -> None:
    stub = auth_server.stub()
    channel = auth_server.channels[-1]
    metadata = bearer(token)
    outcomes = {
        "ModelInfer": code_of(stub.ModelInfer, infer_request("dense", {"input": X}), metadata)[0],
        "ModelStreamInfer": _stream_infer(stub, metadata),
        "ServerLive": code_of(stub.ServerLive, pb.ServerLiveRequest(), metadata)[0],
        "ModelMetadata": code_of(stub.ModelMetadata, pb.ModelMetadataRequest(name="dense"), metadata)[0],
        "ModelConfig": code_of(stub.ModelConfig, pb.ModelConfigRequest(name="dense"), metadata)[0],
        "ServerMetadata": code_of(stub.ServerMetadata, pb.ServerMetadataRequest(), metadata)[0],
        "ModelStatistics": code_of(stub.ModelStatistics, pb.ModelStatisticsRequest(name="dense"), metadata)[0],
        "RepositoryIndex": code_of(stub.RepositoryIndex, pb.RepositoryIndexRequest(), metadata)[0],
        "reflection": _reflection_list(channel, metadata),
        "RepositoryModelLoad": code_of(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="dense"),
                                       metadata)[0],
    }
    expected = {call: grpc.StatusCode.OK if scopes & TOKEN_SCOPES[token] else DENIED
                for call, scopes in SCOPE_OF_CALL.items()}
    assert outcomes == expected


def test_permission_denied_names_the_missing_scope_and_what_the_token_grants(auth_server: RunningServer) -> None:
    stub = auth_server.stub()
    code, details = code_of(stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="dense"),
                            bearer(INFER_TOKEN))
    assert code == DENIED
    assert details == "the token does not grant the 'repository' scope that RepositoryModelUnload needs (it grants: " \
                      "infer)"
    assert stub.ModelReady(pb.ModelReadyRequest(name="dense"), timeout=5, metadata=bearer(META_TOKEN)).ready


def test_every_rpc_has_a_scope_and_unknown_methods_need_the_most_privileged_one() -> None:
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}
    assert set(security.INFERENCE_METHOD_SCOPES) == methods
    assert required_scope("/grpc.health.v1.Health/Check") is None
    assert required_scope("/grpc.health.v1.Health/Watch") is None
    assert required_scope("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") == "metadata"
    assert required_scope("/inference.GRPCInferenceService/ModelInfer") == "infer"
    assert required_scope("/inference.GRPCInferenceService/RepositoryModelLoad") == "repository"
    assert required_scope("/some.Other/Method") == "repository"


def test_unknown_method_reveals_nothing_without_a_token(auth_server: RunningServer) -> None:
    with grpc.insecure_channel(auth_server.address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/NoSuchMethod")
        with pytest.raises(grpc.RpcError) as anonymous:
            call(b"", timeout=5)
        with pytest.raises(grpc.RpcError) as admin:
            call(b"", timeout=5, metadata=bearer(ADMIN_TOKEN))
    assert anonymous.value.code() == grpc.StatusCode.UNIMPLEMENTED  # grpc answers before any handler exists
    assert admin.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_client_sdk_token_argument_authenticates_sync_and_async_calls(auth_server: RunningServer) -> None:
    with InferenceClient(auth_server.address, token=INFER_TOKEN) as client:
        np.testing.assert_allclose(client.infer("dense", {"input": X}), dense_reference(X), atol=1e-6)
    with InferenceClient(auth_server.address, token="wrong-token-0123456789abcdef", timeout=10) as wrong:
        with pytest.raises(InferenceError) as caught:
            wrong.infer("dense", {"input": X})
        assert caught.value.code == UNAUTHENTICATED
        assert Attempts(RetryPolicy(), timeout_s=10).next_delay_s(caught.value) is None  # never retried
    with InferenceClient(auth_server.address, token=INFER_TOKEN) as infer_only:
        # an infer-only token runs everything documented for inference: metadata-named infer, infer_many, readiness
        np.testing.assert_allclose(infer_only.infer("dense", X), dense_reference(X), atol=1e-6)
        rows = np.tile(X, (20, 1))
        np.testing.assert_allclose(infer_only.infer_many("dense", rows, batch_size=64), dense_reference(rows),
                                   atol=1e-6)
        infer_only.wait_until_ready(timeout=30, models=["dense"])
        with pytest.raises(InferenceError) as denied:
            infer_only.model_statistics("dense")
    assert denied.value.code == DENIED
    assert "'metadata' scope" in denied.value.message

    async def async_calls() -> object:
        async with AsyncInferenceClient(auth_server.address, token=ADMIN_TOKEN) as aclient:
            assert await aclient.is_model_ready("dense")
            return await aclient.infer("dense", X)

    np.testing.assert_allclose(asyncio.run(async_calls()), dense_reference(X), atol=1e-6)


def test_tokens_are_compared_in_constant_time_against_every_configured_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table = TokenTable.parse(TOKENS, "tokens.txt")
    calls: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", counting)
    for token in (INFER_TOKEN, ADMIN_TOKEN, "nobody-has-this-token-0123"):
        calls.clear()
        table.match(token)
        assert len(calls) == len(table) == 4  # no early exit, whichever entry (if any) matches
        assert all(len(a) == len(b) == 32 for a, b in calls)  # SHA-256 digests: equal lengths, nothing to leak
    assert table.match(META_TOKEN).scopes == frozenset({"metadata"})  # type: ignore[union-attr]
    assert table.match(META_TOKEN + "x") is None
    assert "0123456789abcdef" not in repr(table)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("short infer", "line 1: the token must be 16 to 4096 characters"),
        ("# comment\n\nvalid-token-0123456789 infer,admin", "line 3: unknown scope 'admin'"),
        ("valid-token-0123456789 infer\nvalid-token-0123456789 metadata", "line 2: the same token is defined twice"),
        ("valid-token-0123456789", "line 1: expected 'TOKEN SCOPES [NAME]'"),
        ("valid-token-0123456789 infer name extra", "line 1: expected 'TOKEN SCOPES [NAME]'"),
        ("bad\x7ftoken-0123456789abc infer", "line 1: the token must be"),
        ("# only comments\n", "defines no tokens"),
    ],
)
def test_token_file_errors_name_the_line_and_never_echo_a_token(text: str, fragment: str) -> None:
    with pytest.raises(SecurityConfigError) as caught:
        TokenTable.parse(text, "tokens.txt")
    assert fragment in str(caught.value)
    assert "0123456789" not in str(caught.value)


def test_token_configuration_errors_stop_the_start_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "tokens.txt").write_text("valid-token-0123456789 infer,everything\n")
    ports = {"grpc_port": 0, "http_port": None, "metrics_port": None}
    cases = [
        (ServerSettings(tmp_path, **ports, auth_token_file=tmp_path / "tokens.txt"),  # type: ignore[arg-type]
         "tokens.txt, line 1: unknown scope 'everything'"),
        (ServerSettings(tmp_path, **ports, auth_token_file=tmp_path / "missing.txt"),  # type: ignore[arg-type]
         "missing.txt: cannot be read"),
        (ServerSettings(tmp_path, **ports, auth_tokens="  ;  "), "defines no tokens"),  # type: ignore[arg-type]
    ]
    for settings, fragment in cases:
        with pytest.raises(StartupError, match=fragment):
            asyncio.run(create_server(settings))
    with pytest.raises(ValueError, match="not both"):
        ServerSettings(tmp_path, auth_token_file=tmp_path / "tokens.txt", auth_tokens="x")
    assert "valid-token" not in repr(ServerSettings(tmp_path, auth_tokens="valid-token-0123456789 infer"))


def test_tokens_never_reach_the_log_even_at_debug_level(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "dense", dense_model(DENSE_W, DENSE_B))
    token_file = tmp_path / "tokens.txt"
    token_file.write_text(TOKENS)
    port_file = tmp_path / "ports.json"
    command = serve_command(repo, port_file, "--device", "cpu", "--auth-token-file", str(token_file))
    command[command.index("serve"):command.index("serve")] = ["--log-level", "DEBUG"]
    log_path = tmp_path / "serve.log"
    presented = [INFER_TOKEN, META_TOKEN, "wrong-token-abcdefghijklmnop", f"{ADMIN_TOKEN}-suffix"]
    with start_server_process(command, log_path, port_file) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            response = stub.ModelInfer(infer_request("dense", {"input": X}), timeout=10, metadata=bearer(INFER_TOKEN))
            np.testing.assert_allclose(output_arrays(response)["output"], dense_reference(X), atol=1e-6)
            for token in presented:
                code_of(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="dense"), bearer(token))
                code_of(stub.ModelInfer, infer_request("dense", {"input": X}), bearer(token))
        server.terminate()
        server.process.wait(30)
    log = log_path.read_text()
    assert "refused /inference.GRPCInferenceService/RepositoryModelLoad" in log, log[-2000:]  # DEBUG was on
    assert "token dashboards lacks scope repository" in log  # tokens are named by their name, never shown
    assert "token authentication: on (4 tokens" in log
    for token in (*presented, REPO_TOKEN, ADMIN_TOKEN):
        assert token not in log
    assert "0123456789abcdef" not in log
