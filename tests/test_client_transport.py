"""The client's transport against real servers: retries while a server starts late, deadlines bounding retries,
client-side round-robin across two `nnserve serve` processes (proven by their statistics), gzip and bearer tokens,
TLS and mutual TLS (`nnserve serve --tls-*`) with certificates generated in the test.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest

from nnserve.builder import load_spec
from nnserve.builder.reference import forward
from nnserve.client import AsyncInferenceClient, InferenceClient, Keepalive, RetryPolicy, ServerUnavailableError
from nnserve.client.connection import ConnectionSettings, call_metadata, channel_target
from nnserve.client.retry import Attempts
from tests.conftest import RunningServer, ServeProcess, held_port, running_server, serve_process
from tests.pki import Pki, make_pki, serve_tls

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SOFTMAX = "two_layer_softmax"
LAYER = "layer_4x3"
X = np.array([[1.5, -0.5], [0.0, 1.0], [-2.0, 3.0]], dtype=np.float32)


def expected(example: str, x: np.ndarray) -> np.ndarray:
    return forward(load_spec(EXAMPLES / example), x)


def test_gzip_keepalive_and_a_bearer_token_do_not_change_results(server: RunningServer) -> None:
    options = {"gzip": True, "token": "s3cret", "headers": {"X-Tenant": "a"}, "keepalive": Keepalive()}
    with InferenceClient(server.address, **options) as sync_client:
        np.testing.assert_allclose(sync_client.infer(SOFTMAX, X), expected("001_two_layer_softmax.json", X), rtol=1e-6)

    async def async_call() -> object:
        async with AsyncInferenceClient(server.address, **options) as aclient:
            return await aclient.infer(SOFTMAX, X)

    np.testing.assert_allclose(asyncio.run(async_call()), expected("001_two_layer_softmax.json", X), rtol=1e-6)
    assert call_metadata("s3cret", {"X-Tenant": "a"}) == (("x-tenant", "a"), ("authorization", "Bearer s3cret"))
    keepalive = dict(ConnectionSettings("h:1", keepalive=Keepalive(time_s=20, timeout_s=5)).options())
    assert (keepalive["grpc.keepalive_time_ms"], keepalive["grpc.keepalive_timeout_ms"]) == (20_000, 5_000)


# -- retries ---------------------------------------------------------------------------------------------------


def test_client_retries_unavailable_until_a_late_server_comes_up(standard_repo: Path) -> None:
    with held_port() as port:
        url = f"127.0.0.1:{port}"
        with InferenceClient(url, retry=None) as impatient, pytest.raises(ServerUnavailableError):
            impatient.is_server_live()  # nothing listens yet: without retries this fails at once
        patient = RetryPolicy(max_attempts=1_000_000, initial_backoff_s=0.05, max_backoff_s=0.2)  # bounded by time
        outcome: dict[str, object] = {}
        with InferenceClient(url, retry=patient, timeout=60) as client:
            channel = client._connect()[0][0]
            tried = threading.Event()
            channel.subscribe(lambda state: state is grpc.ChannelConnectivity.TRANSIENT_FAILURE and tried.set(),
                              try_to_connect=True)

            def call() -> None:
                try:
                    outcome["live"] = client.is_server_live()
                except Exception as exc:
                    outcome["error"] = exc

            caller = threading.Thread(target=call)
            caller.start()
            assert tried.wait(30)  # the first attempt failed to connect before the server existed
            with running_server(standard_repo, grpc_port=port, reuse_port=True):
                caller.join(60)
                assert outcome == {"live": True}  # answered only through retries
                np.testing.assert_allclose(client.infer(SOFTMAX, X), expected("001_two_layer_softmax.json", X),
                                           rtol=1e-6)


def test_retries_stop_at_the_deadline_and_at_max_attempts() -> None:
    with held_port() as port, InferenceClient(
        f"127.0.0.1:{port}", retry=RetryPolicy(max_attempts=1_000_000, max_backoff_s=0.1), timeout=0.5
    ) as c:
        started = time.monotonic()
        with pytest.raises(ServerUnavailableError):
            c.is_server_live()
        assert time.monotonic() - started < 10.0  # a 0.5 s deadline; 20x margin for a busy machine
    unavailable = ServerUnavailableError("no server", grpc.StatusCode.UNAVAILABLE)
    attempts = Attempts(RetryPolicy(max_attempts=3, initial_backoff_s=0.0, max_backoff_s=0.0), None)
    assert [attempts.next_delay_s(unavailable) for _ in range(4)] == [0.0, 0.0, None, None]
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.01)
    assert all(0 <= policy.backoff_s(n) <= 0.01 for n in range(10))
    assert RetryPolicy.disabled().max_attempts == 1


def test_round_robin_spreads_requests_over_two_server_processes(standard_repo: Path, tmp_path: Path) -> None:
    with (
        serve_process(standard_repo, tmp_path / "a.log", "--device", "cpu") as first,
        serve_process(standard_repo, tmp_path / "b.log", "--device", "cpu") as second,
    ):
        with InferenceClient(f"{first.address},{second.address}") as balanced:
            for _ in range(40):
                balanced.infer(LAYER, np.ones((1, 4), dtype=np.float32))
        counts = []
        for backend in (first, second):
            with InferenceClient(backend.address) as direct:
                counts.append(direct.model_statistics(LAYER)[0].success.count)
        first.terminate()
        second.terminate()
    assert sum(counts) == 40
    assert min(counts) >= 10, f"requests were not spread: {counts}"


def test_url_forms_become_grpc_targets_with_round_robin_for_several_backends() -> None:
    assert channel_target("127.0.0.1:1,127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target("[::1]:1, [::1]:2") == "ipv6:[::1]:1,[::1]:2"
    assert channel_target("grpc://host:8001") == "host:8001"
    assert channel_target("dns:///svc.ns.svc.cluster.local:8001") == "dns:///svc.ns.svc.cluster.local:8001"
    options = dict(ConnectionSettings("dns:///svc:8001").options())
    assert "round_robin" in options["grpc.service_config"]
    assert "grpc.service_config" not in dict(ConnectionSettings("host:8001").options())
    with pytest.raises(ValueError, match="host:port"):
        channel_target("127.0.0.1:1,127.0.0.1")
    with pytest.raises(ValueError, match="cannot resolve"):
        channel_target("127.0.0.1:1,no-such-host.invalid:2")


# -- TLS and mutual TLS ------------------------------------------------------------------------------------------
# `nnserve serve --tls-cert/--tls-key [--tls-client-ca]` with certificates made in the test (tests/pki.py).


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@contextmanager
def tls_server(repository: Path, pki: Pki, log: Path, *, mutual: bool) -> Iterator[ServeProcess]:
    """The TLS (or mutual TLS) server, awaited on its health service through a TLS channel."""
    with serve_tls(repository, pki, log, mutual=mutual) as running:
        yield running


def test_tls_client_verifies_the_server_with_the_given_ca(standard_repo: Path, pki: Pki, tmp_path: Path) -> None:
    with tls_server(standard_repo, pki, tmp_path / "tls.log", mutual=False) as server:
        with InferenceClient(server.address, root_certificates=pki.ca) as secure:  # a path
            np.testing.assert_allclose(secure.infer(SOFTMAX, X), expected("001_two_layer_softmax.json", X), rtol=1e-6)
        with InferenceClient(server.address, root_certificates=pki.ca.read_text()) as secure:  # PEM text
            assert secure.is_model_ready(SOFTMAX)
        with (
            InferenceClient(server.address, tls=True, retry=None, timeout=5) as untrusting,
            pytest.raises(ServerUnavailableError) as untrusted,
        ):
            untrusting.is_server_live()  # system roots do not trust the test CA
        assert "the TLS handshake failed" in untrusted.value.message
        with InferenceClient(server.address, retry=None, timeout=5) as plaintext, \
                pytest.raises(ServerUnavailableError) as refused:
            plaintext.is_server_live()
        assert "if it serves TLS, connect with tls=True" in refused.value.message


def test_a_tls_client_against_a_plaintext_server_is_told_why(server: RunningServer, pki: Pki) -> None:
    with InferenceClient(server.address, root_certificates=pki.ca, retry=None, timeout=5) as secure, \
            pytest.raises(ServerUnavailableError) as caught:
        secure.is_server_live()
    assert "the server may serve plaintext" in caught.value.message


def test_mutual_tls_needs_the_client_certificate(standard_repo: Path, pki: Pki, tmp_path: Path) -> None:
    with tls_server(standard_repo, pki, tmp_path / "mtls.log", mutual=True) as server:
        with InferenceClient(
            server.address,
            root_certificates=pki.ca.read_bytes(),
            private_key=pki.client_key.read_bytes(),
            certificate_chain=pki.client_cert.read_bytes(),
        ) as mutual:
            np.testing.assert_allclose(mutual.infer(SOFTMAX, X), expected("001_two_layer_softmax.json", X), rtol=1e-6)

        async def async_mutual() -> bool:
            async with AsyncInferenceClient(
                server.address, root_certificates=pki.ca, private_key=pki.client_key, certificate_chain=pki.client_cert
            ) as aclient:
                return await aclient.is_model_ready(SOFTMAX)

        assert asyncio.run(async_mutual())
        with (
            InferenceClient(server.address, root_certificates=pki.ca, retry=None, timeout=5) as anonymous,
            pytest.raises(ServerUnavailableError),
        ):
            anonymous.is_server_live()
    with pytest.raises(ValueError, match="both private_key and certificate_chain"):
        InferenceClient("127.0.0.1:1", root_certificates=pki.ca, private_key=pki.client_key)
