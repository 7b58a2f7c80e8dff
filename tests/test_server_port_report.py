"""`--port-file` and the `ports:` log line: a server started on port 0 says which ports it bound, before its models
load, for one process and for `--workers N` (where the supervisor reports)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import urllib.request
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from nnserve.server.app import StartupError, create_server
from nnserve.server.cli import add_arguments, settings_from
from nnserve.server.settings import ServerSettings
from tests.conftest import (
    DENSE_B,
    DENSE_W,
    ServeProcess,
    dense_model,
    running_server,
    start_server_process,
    write_model,
)

pytestmark = pytest.mark.timeout(120)


def _repository(root: Path) -> Path:
    write_model(root, "dense", dense_model(DENSE_W, DENSE_B))
    return root


def _serve(repository: Path, tmp_path: Path, *extra: str, wait: bool = True) -> AbstractContextManager[ServeProcess]:
    """`nnserve serve` on ports 0 with its report in a folder of its own (so that leftovers would show); with `wait`,
    once its health service answers."""
    port_file, log = tmp_path / "run" / "ports.json", tmp_path / "serve.log"
    port_file.parent.mkdir()
    command = [sys.executable, "-m", "nnserve", "serve", "--model-repository", str(repository), "--host", "127.0.0.1",
               "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0", "--port-file", str(port_file),
               "--device", "cpu", *extra]
    return start_server_process(command, log, port_file, wait=wait)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def test_in_process_server_reports_its_ports_while_it_serves_and_removes_the_file_when_it_stops(
    tmp_path: Path,
) -> None:
    port_file = tmp_path / "ports.json"
    with running_server(_repository(tmp_path / "repo"), port_file=port_file) as server:
        report = json.loads(port_file.read_text())
        assert report == {"pid": os.getpid(), "host": "127.0.0.1", "grpc": server.port, "http": None, "metrics": None}
        assert list(report) == ["pid", "host", "grpc", "http", "metrics"]
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the temporary file was renamed
    assert not port_file.exists()


def test_serve_on_port_0_writes_the_bound_ports_before_loading_and_logs_them(tmp_path: Path) -> None:
    with _serve(_repository(tmp_path / "repo"), tmp_path) as server:
        report = server.ports
        assert set(report) == {"pid", "host", "grpc", "http", "metrics"}
        assert report["pid"] == server.process.pid
        assert report["host"] == "127.0.0.1"
        assert report["grpc"] > 0
        assert report["metrics"] > 0
        assert len({report["grpc"], report["http"], report["metrics"]}) == 3
        with urllib.request.urlopen(f"http://127.0.0.1:{report['http']}/v2/health/live", timeout=10) as live:
            assert live.status == 200
        assert "nnserve_model_ready" in _scrape(report["metrics"])
        server.terminate()
        assert server.process.wait(timeout=60) == 0
    port_file = tmp_path / "run" / "ports.json"
    text = server.log()
    line = f"ports: grpc={report['grpc']} http={report['http']} metrics={report['metrics']}"
    assert line in text, text
    assert text.index(line) < text.index("loaded model 'dense'"), "the ports must be reported before models load"
    assert not port_file.exists(), "a cleanly stopped server removes its port file"
    assert list(port_file.parent.iterdir()) == []


def test_workers_supervisor_reports_its_pid_the_shared_port_and_the_merged_metrics_port(tmp_path: Path) -> None:
    with _serve(_repository(tmp_path / "repo"), tmp_path, "--workers", "2") as server:
        report = server.ports
        assert report["pid"] == server.process.pid  # the supervisor, not a worker
        assert "nnserve_workers" in _scrape(report["metrics"])
        assert json.loads((tmp_path / "run" / "ports.json").read_text()) == report  # no worker overwrote it
        server.terminate()
        assert server.process.wait(timeout=60) == 0
    text = server.log()
    workers = {int(pid) for pid in re.findall(r"\[worker \d+ pid (\d+)\]", text)}
    assert len(workers) == 2, text
    for pid in workers:  # the supervisor reaped its workers before it ended
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert text.count("ports: grpc=") == 1, text  # one line, the supervisor's
    assert f"ports: grpc={report['grpc']} http={report['http']} metrics={report['metrics']}" in text
    assert not (tmp_path / "run" / "ports.json").exists()


def test_a_stop_while_the_workers_are_still_starting_is_drained_by_each_of_them(tmp_path: Path) -> None:
    """SIGTERM as soon as the supervisor has reported its ports, that is before its workers have started (it writes
    the report first): each worker holds the forwarded signal until its server's handler is in place, then stops
    as a drain does, and the supervisor exits 0. Before, a worker still starting was killed by the signal's
    default action and the supervisor exited 1 (seen on a busy machine)."""
    with _serve(_repository(tmp_path / "repo"), tmp_path, "--workers", "2", wait=False) as server:
        server.terminate()
        assert server.process.wait(timeout=60) == 0, server.log()
    text = server.log()
    assert "killed by" not in text, text
    assert len(re.findall(r"\[worker \d pid \d+\] nnserve\.server\.app: received SIGTERM", text)) == 2, text
    assert "all 2 workers stopped\n" in text or text.rstrip().endswith("all 2 workers stopped"), text


def test_port_file_comes_from_the_flag_or_NNSERVE_PORT_FILE() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    from_env = settings_from(parser.parse_args(["--model-repository", "r"]), {"NNSERVE_PORT_FILE": "/run/p.json"})
    assert from_env.port_file == Path("/run/p.json")
    from_flag = settings_from(parser.parse_args(["--model-repository", "r", "--port-file", "f.json"]),
                              {"NNSERVE_PORT_FILE": "/run/p.json"})
    assert from_flag.port_file == Path("f.json")
    assert settings_from(parser.parse_args(["--model-repository", "r"]), {}).port_file is None


def test_an_unwritable_port_file_is_a_startup_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_folder" / "ports.json"
    settings = ServerSettings(_repository(tmp_path / "repo"), host="127.0.0.1", grpc_port=0, http_port=None,
                              metrics_port=None,
                              port_file=missing)

    async def start() -> None:
        app, _port = await create_server(settings)
        try:
            await app.start()
        finally:
            await app.stop(grace=0)

    with pytest.raises(StartupError, match=f"cannot write --port-file {missing}"):
        asyncio.run(start())
