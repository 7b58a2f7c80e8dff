"""Each client has connections of its own, so clients in one process (and one client with `connections` > 1) reach
every worker of `nnserve serve --workers 2`, which balances connections, not requests.

Which worker a connection reached is read from the answers: each worker keeps its own ModelStatistics, so a
connection that reached a worker which did not see every request reports fewer than all of them. The kernel places
each of the 16 connections on either worker, so all 16 landing on one is a 1-in-32768 event.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from nnserve.client import InferenceClient
from tests.conftest import DENSE_B, DENSE_W, dense_model, dense_reference, serve_process, wait_until, write_model
from tests.test_workers import worker_pids

pytestmark = pytest.mark.timeout(180)

CLIENTS = 16
REQUESTS_EACH = 4
X = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)


def successes(client: InferenceClient, model: str) -> int:
    return client.model_statistics(model).get(model).success.count


def test_clients_in_one_process_and_one_client_with_several_connections_reach_both_workers(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "dense", dense_model(DENSE_W, DENSE_B), config={"max_batch_size": 8})
    write_model(repo, "spread", dense_model(DENSE_W, DENSE_B), config={"max_batch_size": 8})
    with serve_process(repo, tmp_path / "serve.log", "--device", "cpu", "--workers", "2") as server:
        # The health check answers from the first worker up; the kernel spreads connections only over the listening
        # ones, so the clients connect once both have said they serve.
        wait_until(lambda: len(worker_pids(server.log(), "ready: serving")) == 2, 60, "both workers' ready line")
        clients = [InferenceClient(server.address, timeout=30) for _ in range(CLIENTS)]
        try:
            errors: list[BaseException] = []

            def work(client: InferenceClient) -> None:
                try:
                    for _ in range(REQUESTS_EACH):
                        np.testing.assert_allclose(client.infer("dense", X), dense_reference(X), atol=1e-6)
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=work, args=(c,)) for c in clients]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert not errors, errors[0]
            seen = [successes(client, "dense") for client in clients]
            assert max(seen) < CLIENTS * REQUESTS_EACH, f"every client reached the same worker: {seen}"
        finally:
            for client in clients:
                client.close()

        with InferenceClient(server.address, timeout=30, connections=CLIENTS) as spread:
            for _ in range(CLIENTS):  # one call per connection, in turn
                spread.infer("spread", {"input": X})
            answers = [successes(spread, "spread") for _ in range(CLIENTS)]
        assert max(answers) < CLIENTS, f"one client's connections all reached one worker: {answers}"
        server.terminate()


def test_connections_is_validated() -> None:
    with pytest.raises(ValueError, match="connections must be an integer in"):
        InferenceClient("127.0.0.1:1", connections=0)
