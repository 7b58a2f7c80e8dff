"""`nnserve bench` fails (exit 1, failures by status on stderr) when any request failed, unless `--allow-status`
names every status that did.

The server has a one-request queue and a fixed one-second batching window: the first request waits out the window
in the queue (and then succeeds) while the other worker's requests are refused at once with RESOURCE_EXHAUSTED until
`--max-requests` is spent, so every run has both successes and rejections, however fast the machine is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from nnserve.cli import main
from tests.conftest import DENSE_B, DENSE_W, RunningServer, dense_model, running_server, write_model

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def overloaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repository = tmp_path_factory.mktemp("repo")
    write_model(repository, "dense", dense_model(DENSE_W, DENSE_B), config={
        "dynamic_batching": {"max_queue_size": 1, "max_queue_delay_us": 1_000_000, "delay_mode": "fixed"},
    })
    with running_server(repository) as server:
        yield server


def _bench(server: RunningServer, *extra: str) -> int:
    return main(["bench", "dense", "--concurrency", "2", "--duration", "60", "--warmup", "0", "--max-requests", "20",
                 "--url", server.address, *extra])


def test_bench_exits_1_and_lists_the_failures_by_status_when_requests_failed(
    overloaded: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _bench(overloaded) == 1
    err = capsys.readouterr().err
    match = re.search(r"nnserve bench: (\d+) requests failed: RESOURCE_EXHAUSTED (\d+) \(not allowed: "
                      r"RESOURCE_EXHAUSTED\)", err)
    assert match, err
    assert match.group(1) == match.group(2)
    assert int(match.group(1)) >= 1


@pytest.mark.parametrize(
    "allow",
    [
        ["--allow-status", "RESOURCE_EXHAUSTED"],
        ["--allow-status", "unavailable,resource_exhausted"],
        ["--allow-status", "UNAVAILABLE", "--allow-status", "RESOURCE_EXHAUSTED"],
    ],
)
def test_bench_exits_0_when_every_failure_has_an_allowed_status(
    overloaded: RunningServer, capsys: pytest.CaptureFixture[str], allow: list[str]
) -> None:
    assert _bench(overloaded, "--json", *allow) == 0
    captured = capsys.readouterr()
    assert "(all allowed by --allow-status)" in captured.err
    report = json.loads(captured.out)
    assert report["failures"]["RESOURCE_EXHAUSTED"] >= 1
    assert "RESOURCE_EXHAUSTED" in report["allowed_statuses"]
    assert report["levels"][0]["requests"] >= 1


def test_bench_refuses_an_unknown_status_name(overloaded: RunningServer) -> None:
    with pytest.raises(SystemExit) as usage:
        _bench(overloaded, "--allow-status", "SLOW")
    assert usage.value.code == 2


def test_a_failure_free_run_still_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_model(tmp_path, "dense", dense_model(DENSE_W, DENSE_B))
    with running_server(tmp_path) as server:
        assert main(["bench", "dense", "--concurrency", "1", "--duration", "30", "--warmup", "0",
                     "--max-requests", "5", "--url", server.address]) == 0
    assert "failed" not in capsys.readouterr().err
