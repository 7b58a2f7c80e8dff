"""TLS and mutual TLS on the gRPC port, configured from NNSERVE_* variables, with certificates made in the test.

tests/test_client_transport.py covers the flags (`--tls-cert`, `--tls-key`, `--tls-client-ca`) from the client's
side; here: the environment variables, a client certificate signed by another CA, TLS combined with tokens, and
unusable TLS files stopping the start with a message that names the flag.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import grpc
import numpy as np
import pytest

from nnserve.client import InferenceClient, InferenceError, ServerUnavailableError
from nnserve.server.app import StartupError, create_server
from nnserve.server.settings import ServerSettings
from tests.conftest import DENSE_B, DENSE_W, RunningServer, dense_model, dense_reference, write_model
from tests.pki import SERVER_NAME, Pki, make_pki, serve_tls

HEALTHCHECK = Path(sys.executable).parent / "nnserve-healthcheck"  # installed by `pip install .` beside python

TOKEN = "tls-and-token-0123456789abcdef"
X = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_mutual_tls_from_environment_accepts_only_clients_signed_by_the_client_ca(pki: Pki, tmp_path: Path) -> None:
    write_model(tmp_path / "repo", "dense", dense_model(DENSE_W, DENSE_B))
    env = {"NNSERVE_AUTH_TOKENS": f"{TOKEN} infer,metadata app"}
    with serve_tls(tmp_path / "repo", pki, tmp_path / "serve.log", mutual=True, env=env) as server:
        trusted = {"root_certificates": pki.ca, "private_key": pki.client_key, "certificate_chain": pki.client_cert}
        with InferenceClient(server.address, token=TOKEN, **trusted) as client:
            np.testing.assert_allclose(client.infer("dense", {"input": X}), dense_reference(X), atol=1e-6)
        with InferenceClient(server.address, retry=None, timeout=5, **trusted) as tokenless:
            with pytest.raises(InferenceError) as caught:
                tokenless.infer("dense", {"input": X})
            assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED  # TLS and tokens are separate layers
        rogue = {"root_certificates": pki.ca, "private_key": pki.rogue_client_key,
                 "certificate_chain": pki.rogue_client_cert}
        for refused in (rogue, {"root_certificates": pki.ca}):
            with InferenceClient(server.address, token=TOKEN, retry=None, timeout=5, **refused) as client, \
                    pytest.raises(ServerUnavailableError):
                client.is_server_live()
        with InferenceClient(server.address, token=TOKEN, retry=None, timeout=5) as plaintext, \
                pytest.raises(ServerUnavailableError):
            plaintext.is_server_live()
        server.terminate()
        assert server.process.wait(timeout=30) == 0
        log = server.log()
    assert "gRPC transport: TLS, client certificates required; token authentication: on (1 tokens" in log
    assert TOKEN not in log


def test_unusable_tls_files_stop_the_start_naming_the_flag(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    base = {"model_repository": tmp_path, "grpc_port": 0, "http_port": None, "metrics_port": None, "host": "127.0.0.1"}
    cases = [
        ({"tls_cert": pki.server_cert, "tls_key": pki.client_key},
         "--tls-cert .* / --tls-key .*: not a PEM certificate and its matching private key"),
        ({"tls_cert": tmp_path / "missing.pem", "tls_key": pki.server_key}, "--tls-cert .*missing.pem: cannot be read"),
        ({"tls_cert": pki.server_cert, "tls_key": pki.server_key, "tls_client_ca": garbage},
         "--tls-client-ca .*garbage.pem: not a PEM CA certificate"),
    ]
    for overrides, pattern in cases:
        with pytest.raises(StartupError, match=pattern):
            asyncio.run(create_server(ServerSettings(**base, **overrides)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="both tls_cert and tls_key"):
        ServerSettings(tmp_path, tls_cert=pki.server_cert)
    with pytest.raises(ValueError, match="needs tls_cert and tls_key"):
        ServerSettings(tmp_path, tls_client_ca=pki.ca)


def healthcheck(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HEALTHCHECK), *args], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, **(env or {})})


def test_healthcheck_is_installed_with_the_package_and_checks_server_and_models(server: RunningServer) -> None:
    assert HEALTHCHECK.exists(), "pip install . must install nnserve-healthcheck"
    ok = healthcheck("--address", server.address)
    assert (ok.returncode, ok.stdout.strip()) == (0, f"{server.address} service '': SERVING"), ok.stderr
    assert healthcheck("dense", "--address", server.address).returncode == 0
    unknown = healthcheck("no_such_model", "--address", server.address)
    assert unknown.returncode == 1
    assert "NOT_FOUND" in unknown.stdout
    port = server.address.rpartition(":")[2]
    assert healthcheck(env={"NNSERVE_GRPC_PORT": port}).returncode == 0  # the server's own variable, in its container


def test_healthcheck_speaks_tls_and_mutual_tls_with_the_server_name_the_certificate_holds(
    pki: Pki, tmp_path: Path
) -> None:
    write_model(tmp_path / "repo", "dense", dense_model(DENSE_W, DENSE_B))
    with serve_tls(tmp_path / "repo", pki, tmp_path / "tls.log", mutual=False) as tls:
        plaintext = healthcheck("--address", tls.address)
        assert plaintext.returncode == 1
        assert "if the server serves TLS, pass --root-cert" in plaintext.stdout
        assert "I1" not in plaintext.stderr + plaintext.stdout  # gRPC core's own log lines stay out
        assert healthcheck("--address", tls.address, "--root-cert", str(pki.ca)).returncode == 0
        named = healthcheck("--address", tls.address, "--root-cert", str(pki.ca), "--tls-server-name", SERVER_NAME)
        assert named.returncode == 0, named.stdout
        assert healthcheck("--address", tls.address, "--root-cert", str(pki.ca),
                           "--tls-server-name", "not-in-the-certificate.example").returncode == 1
        tls.terminate()
    with serve_tls(tmp_path / "repo", pki, tmp_path / "mtls.log", mutual=True) as mutual:
        assert healthcheck("--address", mutual.address, "--root-cert", str(pki.ca)).returncode == 1
        from_env = healthcheck(env={
            "NNSERVE_HEALTHCHECK_ADDRESS": mutual.address, "NNSERVE_HEALTHCHECK_ROOT_CERT": str(pki.ca),
            "NNSERVE_HEALTHCHECK_CLIENT_CERT": str(pki.client_cert),
            "NNSERVE_HEALTHCHECK_CLIENT_KEY": str(pki.client_key), "NNSERVE_HEALTHCHECK_SERVER_NAME": SERVER_NAME,
        })
        assert from_env.returncode == 0, from_env.stdout + from_env.stderr
        assert "SERVING" in from_env.stdout
        rogue = healthcheck("--address", mutual.address, "--root-cert", str(pki.ca),
                            "--client-cert", str(pki.rogue_client_cert), "--client-key", str(pki.rogue_client_key))
        assert rogue.returncode == 1
        mutual.terminate()
    usage = healthcheck("--client-cert", str(pki.client_cert))
    assert usage.returncode == 2
    assert "needs both --client-cert and --client-key" in usage.stderr
