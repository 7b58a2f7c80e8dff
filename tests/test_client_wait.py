"""Waiting for a server the gRPC way: `wait_for_ready` on calls, `wait_until_ready` and `nnserve wait`.

Every check is an ordering check: a client is started while no server listens on its address (a port the test holds
with a bound, non-listening socket, so nothing else can take it and every connection is refused), the test waits for
the client's channel to have tried and failed to connect, and only then starts the server.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from nnserve.client import AsyncInferenceClient, InferenceClient, ServerNotReadyError, ServerUnavailableError
from tests.conftest import DENSE_B, DENSE_W, dense_model, dense_reference, held_port, running_server, write_model

X = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)


BROKEN_WAIT_S = 3.0
"""How long a wait for a model that never becomes ready runs: its first health answer (NOT_SERVING) must arrive
within it, which on a busy 2-core machine can take far longer than the usual milliseconds."""

def repository(root: Path) -> Path:
    write_model(root, "dense", dense_model(DENSE_W, DENSE_B), config={"max_batch_size": 8})
    return root


def failed_to_connect(channel: grpc.Channel) -> threading.Event:
    """Set once the channel has tried to connect and failed (TRANSIENT_FAILURE)."""
    event = threading.Event()

    def on_change(state: grpc.ChannelConnectivity) -> None:
        if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            event.set()

    channel.subscribe(on_change, try_to_connect=True)
    return event


def test_a_call_started_before_its_server_waits_for_it_with_wait_for_ready_and_fails_without(tmp_path: Path) -> None:
    repo = repository(tmp_path / "repo")
    with held_port() as port:
        address = f"127.0.0.1:{port}"
        with InferenceClient(address, retry=None, timeout=30) as impatient, pytest.raises(ServerUnavailableError):
            impatient.infer("dense", {"input": X})  # no server yet: UNAVAILABLE at once
        result: dict[str, object] = {}
        with InferenceClient(address, retry=None, timeout=60, wait_for_ready=True) as patient:
            tried = failed_to_connect(patient._connect()[0][0])

            def call() -> None:
                try:
                    result["value"] = patient.infer("dense", {"input": X})
                except Exception as exc:
                    result["error"] = exc

            caller = threading.Thread(target=call)
            caller.start()
            assert tried.wait(30), "the waiting client never tried to connect"
            with InferenceClient(address, retry=None, timeout=30) as impatient, pytest.raises(ServerUnavailableError):
                impatient.is_server_live()  # still absent after the patient call began
            assert "error" not in result, result.get("error")
            with running_server(repo, grpc_port=port, reuse_port=True):
                caller.join(60)
                # The server listens before it loads its models, so the waiting call may reach it while 'dense'
                # loads: then the answer is the server's own (the call did wait for it), and the model answers
                # once loading is done.
                again = patient.infer("dense", {"input": X})
        assert not caller.is_alive()
    error = result.get("error")
    if error is not None:
        assert isinstance(error, ServerUnavailableError), error
        assert "model 'dense' is not ready: the model is still loading" in str(error), error
    else:
        np.testing.assert_allclose(result["value"], dense_reference(X), atol=1e-6)  # type: ignore[arg-type]
    np.testing.assert_allclose(again, dense_reference(X), atol=1e-6)  # type: ignore[arg-type]


def test_a_per_call_wait_for_ready_overrides_the_client_default(tmp_path: Path) -> None:
    with held_port() as port, InferenceClient(f"127.0.0.1:{port}", retry=None, timeout=30,
                                              wait_for_ready=True) as client, pytest.raises(ServerUnavailableError):
        client.is_server_live(wait_for_ready=False)


def test_wait_until_ready_returns_once_a_late_server_is_ready(tmp_path: Path) -> None:
    repo = repository(tmp_path / "repo")
    with held_port() as port, InferenceClient(f"127.0.0.1:{port}", retry=None) as client:
        tried = failed_to_connect(client._connect()[0][0])
        outcome: dict[str, object] = {}

        def wait() -> None:
            try:
                client.wait_until_ready(timeout=60, models=["dense"])
                outcome["ready"] = True
            except Exception as exc:
                outcome["error"] = exc

        waiter = threading.Thread(target=wait)
        waiter.start()
        assert tried.wait(30)
        assert not outcome
        with running_server(repo, grpc_port=port, reuse_port=True):
            waiter.join(60)
            assert outcome == {"ready": True}
            np.testing.assert_allclose(client.infer("dense", X), dense_reference(X), atol=1e-6)


def test_wait_until_ready_names_everything_that_was_not_ready(tmp_path: Path) -> None:
    repo = repository(tmp_path / "repo")
    write_model(repo, "broken", b"not an onnx model")
    with running_server(repo, health_service="liveness") as server, InferenceClient(server.address) as client, \
            pytest.raises(ServerNotReadyError) as caught:
        client.wait_until_ready(timeout=BROKEN_WAIT_S, models=["dense", "broken", "nope"])
    error = caught.value
    assert error.not_ready == {"": "NOT_SERVING", "broken": "NOT_SERVING", "nope": "SERVICE_UNKNOWN"}
    assert "the server: NOT_SERVING" in error.message
    assert "model 'broken': NOT_SERVING (not loaded, failed to load, or unloaded)" in error.message
    assert "model 'nope': SERVICE_UNKNOWN (the server has no such model)" in error.message
    assert "'dense'" not in error.message


def test_wait_until_ready_for_a_model_on_a_ready_server(tmp_path: Path) -> None:
    repo = repository(tmp_path / "repo")
    write_model(repo, "broken", b"not an onnx model")
    with running_server(repo, strict_readiness=False) as server, InferenceClient(server.address) as client:
        client.wait_until_ready(timeout=30, models=["dense"])
        with pytest.raises(ServerNotReadyError) as caught:
            client.wait_until_ready(timeout=BROKEN_WAIT_S, models=["broken"])
    assert caught.value.not_ready == {"broken": "NOT_SERVING"}


def test_wait_until_ready_with_nobody_listening_says_no_server_answered() -> None:
    with held_port() as port, InferenceClient(f"127.0.0.1:{port}") as client, \
            pytest.raises(ServerNotReadyError) as caught:
        client.wait_until_ready(timeout=0.5)
    assert f"no server answered at 127.0.0.1:{port} within 0.5 s" in caught.value.message
    assert caught.value.not_ready == {"": "unreachable"}


def test_async_client_waits_the_same_way(tmp_path: Path) -> None:
    repo = repository(tmp_path / "repo")
    write_model(repo, "broken", b"not an onnx model")

    async def scenario(address: str) -> object:
        async with AsyncInferenceClient(address, wait_for_ready=True) as client:
            await client.wait_until_ready(timeout=30, models=["dense"])
            with pytest.raises(ServerNotReadyError) as caught:
                await client.wait_until_ready(timeout=BROKEN_WAIT_S, models=["broken"])
            assert caught.value.not_ready == {"broken": "NOT_SERVING"}
            return await client.infer("dense", X)

    with running_server(repo, strict_readiness=False) as server:
        np.testing.assert_allclose(asyncio.run(scenario(server.address)), dense_reference(X), atol=1e-6)


def test_async_call_started_before_its_server_waits_with_wait_for_ready(tmp_path: Path) -> None:
    repo = repository(tmp_path / "repo")
    with held_port() as port:
        address = f"127.0.0.1:{port}"
        started = threading.Event()
        loop = asyncio.new_event_loop()
        client = AsyncInferenceClient(address, retry=None, timeout=60, wait_for_ready=True)

        async def call() -> object:
            pending = asyncio.ensure_future(client.infer("dense", {"input": X}))
            channel = client._connect()[0][0]
            # Wait for a change from the state last read, never from a second read: a refused connection moves
            # CONNECTING -> TRANSIENT_FAILURE at once, and waiting on a fresh read of TRANSIENT_FAILURE would wait
            # out a reconnect backoff (1 s, then 1.6x more each time) that a busy machine can repeat past 30 s.
            state = channel.get_state(try_to_connect=True)
            while state is not grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                await channel.wait_for_state_change(state)
                state = channel.get_state(try_to_connect=True)
            started.set()
            try:
                return await pending
            finally:
                await client.close()

        future = asyncio.run_coroutine_threadsafe(call(), loop)
        runner = threading.Thread(target=loop.run_forever, daemon=True)
        runner.start()
        try:
            assert started.wait(30)
            assert not future.done()
            with running_server(repo, grpc_port=port, reuse_port=True):
                value = future.result(60)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            runner.join(10)
    np.testing.assert_allclose(value, dense_reference(X), atol=1e-6)  # type: ignore[arg-type]


def test_nnserve_wait_exits_0_when_ready_and_1_naming_what_is_not(tmp_path: Path) -> None:
    repo = repository(tmp_path / "repo")
    with running_server(repo) as server:
        ok = subprocess.run([sys.executable, "-m", "nnserve", "wait", "--url", server.address, "--model", "dense",
                             "--timeout", "30"], capture_output=True, text=True, timeout=60, check=False)
        missing = subprocess.run([sys.executable, "-m", "nnserve", "wait", "--url", server.address, "-m", "nope",
                                  "--timeout", "0.5"], capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    assert f"ready: {server.address} (models 'dense')" in ok.stdout
    assert missing.returncode == 1
    assert "nnserve wait: DEADLINE_EXCEEDED: not ready after 0.5 s" in missing.stderr
    assert "model 'nope': SERVICE_UNKNOWN" in missing.stderr
