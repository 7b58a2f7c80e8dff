"""gRPC core's own log lines (`I1201 12:00:00.000000 123 ssl_transport_security.cc:...] Handshake failed ...`) stay
out of nnserve's processes unless asked for (`nnserve --grpc-verbosity INFO`, or the user's GRPC_VERBOSITY), and
the SDK used as a library leaves its application's environment alone."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DENSE_B, DENSE_W, dense_model, read_port_file, running_server, write_model
from tests.pki import Pki, make_pki

pytestmark = pytest.mark.timeout(180)

GRPC_CORE_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+\.cc:\d+\]", re.MULTILINE)
"""absl's prefix, which gRPC core's lines carry: severity, MMDD, time, thread, file:line."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _environment(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("GRPC_VERBOSITY", "GRPC_TRACE")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _nnserve(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nnserve", *argv], capture_output=True, text=True, timeout=60,
                          env=env or _environment())


def _tls_server_log_after_a_plaintext_call(repository: Path, pki: Pki, tmp_path: Path, *top_level: str) -> str:
    """Run a TLS `nnserve serve`, send it one plaintext `nnserve infer` (which fails), stop it; its whole log."""
    tmp_path.mkdir()
    port_file, log = tmp_path / "ports.json", tmp_path / "serve.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "nnserve", *top_level, "serve", "--model-repository", str(repository),
             "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "off", "--metrics-port", "off",
             "--device", "cpu",
             "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--port-file", str(port_file)],
            stdout=sink, stderr=subprocess.STDOUT, text=True, env=_environment(),
        )
    try:
        port = read_port_file(port_file, process, log)["grpc"]  # bound and listening once the file appears
        plain = _nnserve("infer", "dense", "--data", "[[1, 2, 3]]", "--url", f"127.0.0.1:{port}", "--timeout", "10")
        assert plain.returncode == 1, plain.stderr
        assert not GRPC_CORE_LINE.search(plain.stderr), plain.stderr
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    return log.read_text()


def test_serve_keeps_grpc_cores_handshake_lines_out_of_its_log_unless_asked(pki: Pki, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    write_model(repository, "dense", dense_model(DENSE_W, DENSE_B))
    quiet = _tls_server_log_after_a_plaintext_call(repository, pki, tmp_path / "quiet")
    assert "ready: serving" in quiet
    assert "ssl_transport_security" not in quiet, quiet
    assert not GRPC_CORE_LINE.search(quiet), quiet
    verbose = _tls_server_log_after_a_plaintext_call(repository, pki, tmp_path / "verbose", "--grpc-verbosity", "INFO")
    assert re.search(r"^I\d{4} .*ssl_transport_security\.cc:\d+\] Handshake failed", verbose, re.MULTILINE), verbose


def test_client_commands_are_quiet_unless_the_user_sets_grpc_verbosity(tmp_path: Path, pki: Pki) -> None:
    """A TLS client against a plaintext server: gRPC core logs the failed handshake on the client side."""
    write_model(tmp_path, "dense", dense_model(DENSE_W, DENSE_B))
    with running_server(tmp_path) as server:
        call = ("infer", "dense", "--data", "[[1, 2, 3]]", "--url", server.address, "--root-cert", str(pki.ca),
                "--timeout", "10")
        quiet = _nnserve(*call)
        users_choice = _nnserve(*call, env=_environment(GRPC_VERBOSITY="INFO"))
        flag = _nnserve("--grpc-verbosity", "info", *call)
    for done in (quiet, users_choice, flag):
        assert done.returncode == 1, done.stderr
        assert "TLS handshake failed" in done.stderr or "Tls handshake failed" in done.stderr, done.stderr
    assert not GRPC_CORE_LINE.search(quiet.stderr), quiet.stderr
    assert re.search(r"^I\d{4} .*ssl_transport_security\.cc", users_choice.stderr, re.MULTILINE), users_choice.stderr
    assert re.search(r"^I\d{4} .*ssl_transport_security\.cc", flag.stderr, re.MULTILINE), flag.stderr


def test_the_sdk_as_a_library_leaves_the_environment_alone() -> None:
    program = (
        "import json, os\n"
        "before = dict(os.environ)\n"
        "import nnserve, nnserve.client\n"
        "from nnserve.client import AsyncInferenceClient, InferenceClient\n"
        "with InferenceClient('127.0.0.1:1', timeout=0.5, retry=None) as client:\n"
        "    try:\n"
        "        client.is_server_live()\n"
        "    except Exception:\n"
        "        pass\n"
        "changed = sorted(k for k in {*before, *os.environ} if before.get(k) != os.environ.get(k))\n"
        "print(json.dumps({'changed': changed}))\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
                          env=_environment())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"changed": []}
