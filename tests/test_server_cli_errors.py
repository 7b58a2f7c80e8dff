"""What `nnserve serve` says when it cannot start: a message per bad flag or variable that a person can act on, and
the real reason (alone) when a port is taken."""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nnserve.server.cli import add_arguments, settings_from
from tests.conftest import DENSE_B, DENSE_W, dense_model, write_model

pytestmark = pytest.mark.timeout(120)


def _settings_error(argv: list[str], env: dict[str, str]) -> str:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ValueError, match=r"^--|^NNSERVE_") as raised:  # names the flag or variable first
        settings_from(parser.parse_args(["--model-repository", "r", *argv]), env)
    return str(raised.value)


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {"NNSERVE_GRPC_PORT": "abc"}, "NNSERVE_GRPC_PORT: invalid value 'abc': expected a port number (0-65535)"),
        (["--metrics-port", "http"], {},
         "--metrics-port: invalid value 'http': expected a port number (0-65535) or off"),
        ([], {"NNSERVE_GRACE_PERIOD": "soon"},
         "NNSERVE_GRACE_PERIOD: invalid value 'soon': expected a number of seconds"),
        (["--max-batch-size", "1.5"], {}, "--max-batch-size: invalid value '1.5': expected a whole number"),
        ([], {"NNSERVE_WORKERS": "two"}, "NNSERVE_WORKERS: invalid value 'two': expected a whole number"),
        (["--strict-readiness", "maybe"], {}, "--strict-readiness: invalid value 'maybe': expected true or false"),
        (["--metrics-buckets", "0.1,fast"], {}, "--metrics-buckets: invalid value '0.1,fast': expected increasing "
                                                "numbers of seconds separated by commas"),
        (["--port-file", ""], {}, "--port-file: invalid value '': expected a path"),
        ([], {"NNSERVE_TLS_CERT": " "}, "NNSERVE_TLS_CERT: invalid value ' ': expected a path"),
        # Out of range: ServerSettings' check, prefixed with where the value came from.
        ([], {"NNSERVE_GRPC_PORT": "70000"}, "NNSERVE_GRPC_PORT: grpc_port must be a port number in [0, 65535]"),
        (["--workers", "0"], {}, "--workers: workers must be an integer in [1, 256], got 0"),
    ],
)
def test_a_bad_flag_or_variable_value_says_which_and_what_was_expected(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    error = _settings_error(argv, env)
    assert message in error
    assert "invalid literal" not in error
    assert "could not convert" not in error


def _serve(repository: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nnserve", "serve", "--model-repository", str(repository), "--host", "127.0.0.1",
         "--device", "cpu", *extra],
        capture_output=True, text=True, timeout=90, env={**os.environ, **(env or {})},
    )


def test_serve_with_a_bad_variable_exits_2_with_the_message(tmp_path: Path) -> None:
    done = _serve(tmp_path, env={"NNSERVE_GRPC_PORT": "abc"})
    assert done.returncode == 2
    assert "nnserve serve: error: NNSERVE_GRPC_PORT: invalid value 'abc': expected a port number (0-65535)" in \
        done.stderr


def test_metrics_port_taken_logs_the_critical_reason_naming_it_and_no_grace_period_warning(tmp_path: Path) -> None:
    write_model(tmp_path, "dense", dense_model(DENSE_W, DENSE_B))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = _serve(tmp_path, "--grpc-port", "0", "--metrics-port", str(port))
    assert done.returncode == 1, done.stderr
    assert re.search(rf"CRITICAL .*cannot serve metrics on 127\.0\.0\.1:{port}", done.stderr), done.stderr
    assert "requests were still running" not in done.stderr, done.stderr
    assert "WARNING" not in done.stderr, done.stderr
