"""Throwaway certificates for TLS tests, made with the `openssl` command line (no Python dependency).

One CA signs a server certificate (for 127.0.0.1, localhost and SERVER_NAME) and a client certificate; a second,
unrelated CA signs a "rogue" client certificate, so that tests can show mutual TLS checks who signed a client's
certificate, not merely that one was sent.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import ServeProcess, read_port_file, serve_command

SERVER_NAME = "nnserve.example.internal"
"""A name the server certificate also holds, for checks of `tls_server_name` against a 127.0.0.1 address."""
_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


@dataclass(frozen=True)
class Pki:
    """PEM files: the CA, the server's certificate and key, a client pair it signed, and a rogue client pair."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_client_cert: Path
    rogue_client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _ca(root: Path, name: str) -> None:
    _openssl("req", "-x509", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1",
             "-subj", f"/CN=nnserve test {name}", cwd=root)


def _issue(root: Path, ca: str, name: str, extensions: str) -> None:
    (root / f"{name}.ext").write_text(extensions + "\n")
    _openssl("req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=root)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=root)


def make_pki(root: Path) -> Pki:
    """Write the certificates into `root` (about 0.2 s)."""
    _ca(root, "ca")
    _ca(root, "rogue_ca")
    _issue(root, "ca", "server",
           f"subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:{SERVER_NAME}\nextendedKeyUsage=serverAuth")
    _issue(root, "ca", "client", "extendedKeyUsage=clientAuth")
    _issue(root, "rogue_ca", "rogue_client", "extendedKeyUsage=clientAuth")
    return Pki(root / "ca.pem", root / "server.pem", root / "server.key", root / "client.pem", root / "client.key",
               root / "rogue_client.pem", root / "rogue_client.key")


def tls_credentials(pki: Pki, *, client: bool) -> grpc.ChannelCredentials:
    """Channel credentials trusting the test CA; with the signed client pair when `client`."""
    pair = (pki.client_key.read_bytes(), pki.client_cert.read_bytes()) if client else (None, None)
    return grpc.ssl_channel_credentials(pki.ca.read_bytes(), *pair)


@contextmanager
def serve_tls(
    repository: Path, pki: Pki, log_path: Path, *extra: str, mutual: bool, env: Mapping[str, str] | None = None
) -> Iterator[ServeProcess]:
    """`nnserve serve --tls-cert --tls-key [--tls-client-ca]`, awaited on its health service over TLS.

    With `env`, the TLS settings come from NNSERVE_TLS_* variables instead of flags.
    """
    port_file = log_path.with_suffix(".ports.json")
    tls = {"--tls-cert": pki.server_cert, "--tls-key": pki.server_key}
    if mutual:
        tls["--tls-client-ca"] = pki.ca
    flags: list[str] = []
    variables = dict(env or {})
    for flag, path in tls.items():
        if env is None:
            flags += [flag, str(path)]
        else:
            variables["NNSERVE_" + flag.removeprefix("--").replace("-", "_").upper()] = str(path)
    with log_path.open("wb") as sink:
        process = subprocess.Popen(
            serve_command(repository, port_file, "--device", "cpu", *flags, *extra), stdout=sink,
            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **variables},
        )
    try:
        running = ServeProcess(process, read_port_file(port_file, process, log_path), log_path)  # type: ignore[arg-type]
        with grpc.secure_channel(running.address, tls_credentials(pki, client=mutual)) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=30, wait_for_ready=True
            )
            try:
                next(r for r in watch if r.status == health_pb2.HealthCheckResponse.SERVING)
            except grpc.RpcError as error:
                raise AssertionError(f"TLS server never became SERVING ({error.code()}):\n{running.log()}") from None
            watch.cancel()
        yield running
    finally:
        process.kill()
        process.wait(10)
