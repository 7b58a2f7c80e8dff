"""Requests for unknown models that end in the clients' metadata pre-call are counted too, apart from inference
requests: `nnserve_model_lookup_failures_total`, with the same bounded labels as `nnserve_requests_total`."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest

from nnserve.builder import build
from nnserve.client import InferenceClient, ModelNotFoundError, ServerUnavailableError
from tests.conftest import EXAMPLES, RunningServer, running_server, write_model

SOFTMAX = "two_layer_softmax"


@pytest.fixture(scope="module")
def lookup_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repository = tmp_path_factory.mktemp("lookups")
    build(EXAMPLES / "001_two_layer_softmax.json", repository)
    write_model(repository, "broken", b"not an onnx model")
    with running_server(repository, health_service=SOFTMAX, metrics_port=0, strict_readiness=False) as running:
        yield running


def lookups(server: RunningServer) -> dict[tuple[str, ...], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.app.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = {}
    for labels, value in re.findall(r"^nnserve_model_lookup_failures_total\{([^}]*)\} (\S+)$", text, re.MULTILINE):
        items = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        found[(items["model"], items["version"], items["rpc"], items["reason"])] = float(value)
    return found


def requests_total(server: RunningServer, model: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.app.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(v) for v in re.findall(rf'^nnserve_requests_total\{{[^}}]*model="{model}"[^}}]*\}} (\S+)$',
                                             text, re.MULTILINE))


def test_sdk_and_cli_requests_for_unknown_models_are_counted_as_lookup_failures(lookup_server: RunningServer) -> None:
    before, unknown_requests_before = lookups(lookup_server), requests_total(lookup_server, "_unknown")
    with InferenceClient(lookup_server.address, retry=None, timeout=10) as client:
        for name in ("no_such_model", "another_unknown"):
            with pytest.raises(ModelNotFoundError):
                client.infer(name, np.ones((1, 2), np.float32))
        with pytest.raises(ModelNotFoundError):
            client.model_config("no_such_model")
        with pytest.raises(ServerUnavailableError):
            client.infer("broken", np.ones((1, 2), np.float32))
    cli = subprocess.run(
        [sys.executable, "-m", "nnserve", "infer", "no_such_model", "--data", "[[1, 2]]", "--url",
         lookup_server.address, "--timeout", "10"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert cli.returncode == 1, cli.stderr
    after = lookups(lookup_server)

    def delta(*key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("_unknown", "_unknown", "ModelMetadata", "not_found") == 3  # two SDK calls and the CLI
    assert delta("_unknown", "_unknown", "ModelConfig", "not_found") == 1
    assert delta("broken", "", "ModelMetadata", "not_ready") == 1
    assert requests_total(lookup_server, "_unknown") == unknown_requests_before  # inference counts unchanged
    assert not any("no_such_model" in "".join(key) for key in after)  # client-chosen names never become labels


def test_successful_lookups_count_nothing(lookup_server: RunningServer) -> None:
    before = lookups(lookup_server)
    with InferenceClient(lookup_server.address, timeout=10) as client:
        client.model_metadata(SOFTMAX)
        client.model_config(SOFTMAX)
    assert lookups(lookup_server) == before
