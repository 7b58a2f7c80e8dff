"""The threaded gRPC transport (`--grpc-transport threads`) keeps every guarantee the default one gives.

The suite's protocol, error, deadline, cancellation, streaming, limits, token, decoding-guard, statistics, drain
and worker tests are collected here a second time: imported by name, with this module's fixtures standing in for
theirs, so the same servers are started with the threaded transport (in-process: `grpc_transport="threads"`;
subprocesses: `NNSERVE_GRPC_TRANSPORT=threads`, set for every test of this module). Then what only this transport
does: a lone request runs from the socket to the response on grpc's pool thread with no hand-off to the event loop,
and a lone request to a model too slow to run inline runs on that thread on the instance lent to it, while
requests arriving meanwhile queue and batch as usual.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from nnserve.protos import grpc_service_pb2 as pb
from nnserve.server import batcher as batcher_module
from tests.conftest import (
    DENSE_B,
    DENSE_W,
    RunningServer,
    dense_model,
    dense_reference,
    infer_request,
    multi_io_model,
    output_arrays,
    running_server,
    scale_model,
    serve_process,
    slow_model,
    wait_until,
    write_model,
)
from tests.test_client_sdk import (  # noqa: F401
    client,
    explicit_server,
    test_model_statistics_count_each_request_and_row,
    test_unload_makes_a_model_unavailable_and_load_brings_it_back,
)
from tests.test_perf_server import (  # noqa: F401 - collected again here, on this module's perf_server
    CHAIN_W,
    LONG_ROWS,
    MID_W,
    SLOW_W,
    RecordingTimer,
    any_width_model,
    chain_model,
    test_full_queue_rejects_with_resource_exhausted_and_the_accepted_requests_succeed,
    test_hundreds_of_concurrent_requests_through_the_server_each_get_their_own_rows,
    test_request_cancelled_by_its_caller_while_queued_is_never_executed,
    test_request_whose_grpc_deadline_passes_while_queued_is_never_executed,
    test_requests_of_different_widths_are_batched_apart_and_each_gets_its_own_result,
)
from tests.test_reliability_deadlines import (  # noqa: F401
    BLOCKER,
    WIDTH,
    test_caller_leaving_during_execution_loses_only_its_own_result,
    test_completed_requests_are_delivered_and_counted_once_even_if_the_caller_cancels_afterwards,
    test_every_response_of_a_stream_arrives_even_when_the_client_stops_sending_at_once,
    test_request_cancelled_while_queued_is_never_executed,
    test_request_whose_deadline_passes_while_queued_is_never_executed,
)
from tests.test_reliability_drain import (  # noqa: F401
    test_sigterm_under_continuous_load_fails_no_accepted_request_and_exits_within_the_grace_period,
)
from tests.test_reliability_limits import (  # noqa: F401
    test_elements_over_max_tensor_elements_are_refused_per_tensor_and_per_dimension,
    test_more_inputs_raw_entries_or_outputs_than_max_inputs_per_request_are_refused,
    test_rows_over_max_request_rows_are_refused_even_when_the_model_allows_them,
    test_shapes_over_max_tensor_dims_are_refused_before_anything_else,
)
from tests.test_security_auth import (  # noqa: F401
    TOKENS,
    test_calls_without_a_token_are_unauthenticated_while_grpc_health_stays_open,
    test_client_sdk_token_argument_authenticates_sync_and_async_calls,
    test_each_token_is_granted_exactly_the_rpcs_of_its_scopes,
    test_permission_denied_names_the_missing_scope_and_what_the_token_grants,
    test_unknown_method_reveals_nothing_without_a_token,
    test_wrong_or_malformed_tokens_are_unauthenticated,
)
from tests.test_security_tls import (  # noqa: F401
    pki,
    test_healthcheck_speaks_tls_and_mutual_tls_with_the_server_name_the_certificate_holds,
    test_mutual_tls_from_environment_accepts_only_clients_signed_by_the_client_ca,
)
from tests.test_server_decode_guard import (  # noqa: F401
    TOKEN,
    test_reflection_lists_the_services_through_the_guarded_registration,
    test_the_server_still_answers_correctly_after_undecodable_requests,
    test_undecodable_requests_get_invalid_argument_on_every_service,
)
from tests.test_server_errors import (  # noqa: F401
    test_batch_over_max_batch_size_is_rejected_with_the_limit,
    test_both_raw_and_typed_contents_are_rejected,
    test_empty_batch_is_rejected,
    test_message_over_the_size_limit_is_resource_exhausted,
    test_missing_input_is_invalid_argument_naming_it,
    test_onnxruntime_failure_is_internal_with_a_clean_message,
    test_overflowing_dimensions_are_rejected_without_allocating,
    test_raw_contents_of_wrong_byte_length_are_rejected,
    test_unknown_model_is_not_found_and_lists_the_models,
    test_unknown_requested_output_lists_the_outputs,
    test_unknown_version_is_not_found_and_lists_the_versions,
    test_wrong_datatype_says_which_datatype_the_model_takes,
    test_wrong_shape_says_which_dimension_and_the_expected_shape,
)
from tests.test_server_lifecycle import (  # noqa: F401
    test_sigterm_finishes_accepted_requests_refuses_new_ones_and_exits_within_the_grace_period,
)
from tests.test_server_protocol import (  # noqa: F401
    test_fp16_and_fp64_models_take_and_return_their_own_datatype,
    test_health_serves_overall_and_per_model_status,
    test_infer_echoes_id_and_reports_model_version_and_output_signature,
    test_model_config_excludes_batch_dim_and_reports_provider_and_parameter_count,
    test_model_metadata_reports_platform_versions_and_signature_with_dynamic_batch,
    test_model_ready_is_true_for_served_versions_and_false_otherwise,
    test_model_statistics_count_successes_failures_and_executions,
    test_model_without_batch_dimension_takes_its_full_shape,
    test_reflection_lists_the_inference_and_health_services,
    test_repository_index_lists_every_version_with_its_state,
    test_requested_outputs_select_and_order_the_response,
    test_seed_network_returns_the_documents_numbers_through_the_server,
    test_server_live_ready_and_metadata,
    test_several_inputs_and_outputs_of_different_datatypes_round_trip,
    test_stream_infer_answers_each_request_in_order_and_reports_errors_in_band,
    test_typed_fp32_contents_give_the_same_result_as_raw_contents,
    test_version_is_selectable_and_empty_version_means_the_newest,
)
from tests.test_server_triton_client import (  # noqa: F401
    test_triton_python_client_reads_metadata_config_statistics_index_and_infers,
)
from tests.test_workers import CONNECTIONS, connections, worker_pids
from tests.test_workers import repository as workers_repository

THREADS = {"grpc_transport": "threads"}


@pytest.fixture(scope="module", autouse=True)
def _threaded_subprocesses() -> Iterator[None]:
    """`nnserve serve` subprocesses started by the imported tests (and their module fixtures: autouse comes
    first) use the threaded transport too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NNSERVE_GRPC_TRANSPORT", "threads")
        yield


# -- the imported tests' servers, on the threaded transport ------------------------------------------------------


@pytest.fixture(scope="module")
def server(standard_repo: Path) -> Iterator[RunningServer]:
    with running_server(standard_repo, metrics_port=0, **THREADS) as running:
        yield running


@pytest.fixture(scope="module")
def small_limit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("small_limit")
    write_model(repo, "dense", dense_model(DENSE_W, DENSE_B), config={"max_batch_size": 100_000})
    with running_server(repo, max_message_bytes=64 * 1024, **THREADS) as running:
        yield running


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("deadlines")
    write_model(repo, "slow", slow_model(WIDTH, 384), config={"max_batch_size": 64, "instances": 1})
    write_model(repo, "dense", dense_model(DENSE_W, DENSE_B), config={"max_batch_size": 8})
    with running_server(repo, **THREADS) as running:
        yield running


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("limits")
    write_model(repo, "dense", dense_model(DENSE_W, DENSE_B), config={"max_batch_size": 64})
    write_model(repo, "free", scale_model(np.dtype(np.float32), 2.0), config={"max_batch_size": 0})
    write_model(repo, "multi_io", multi_io_model())
    with running_server(repo, max_request_rows=16, max_tensor_dims=3, max_tensor_elements=1000,
                        max_inputs_per_request=2, **THREADS) as running:
        yield running


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("auth")
    write_model(repo, "dense", dense_model(DENSE_W, DENSE_B), config={"max_batch_size": 8})
    with running_server(repo, auth_tokens=TOKENS, model_control="explicit", **THREADS) as running:
        yield running


@pytest.fixture(scope="module", params=["no tokens", "tokens"])
def guarded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, tuple]]:
    repo = tmp_path_factory.mktemp("guard")
    write_model(repo, "dense", dense_model(DENSE_W, DENSE_B), config={"max_batch_size": 8})
    overrides: dict[str, Any] = {"auth_tokens": f"{TOKEN} *"} if request.param == "tokens" else {}
    metadata = (("authorization", f"Bearer {TOKEN}"),) if request.param == "tokens" else ()
    with running_server(repo, **overrides, **THREADS) as running:
        yield running.address, metadata


@pytest.fixture(scope="module")
def perf_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("perf_repository")
    write_model(root, "mid", chain_model(MID_W, 8), config={"max_batch_size": 32})
    write_model(root, "mid_two", chain_model(MID_W, 8), config={"max_batch_size": 32, "instances": 2})
    write_model(root, "tiny_fixed", chain_model(CHAIN_W, 3),
                config={"max_batch_size": 32, "dynamic_batching": {"delay_mode": "fixed", "max_queue_delay_us": 3000}})
    write_model(root, "long", chain_model(SLOW_W, 64), config={"max_batch_size": LONG_ROWS, "instances": 1})
    write_model(root, "slow_small_queue", chain_model(SLOW_W, 64),
                config={"max_batch_size": 16, "dynamic_batching": {"max_queue_size": 2}})
    write_model(root, "any_width", any_width_model(), config={"max_batch_size": 64})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batcher_module, "PreciseTimer", RecordingTimer)
        with running_server(root, device="cpu", **THREADS) as running:
            yield running


# -- what only the threaded transport does ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def lone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("lone")
    write_model(repo, "dense", dense_model(DENSE_W, DENSE_B), config={"max_batch_size": 8})
    write_model(repo, "slow", slow_model(WIDTH, 384), config={"max_batch_size": 64, "instances": 1})
    with running_server(repo, **THREADS) as running:
        yield running


def test_a_lone_request_is_answered_on_grpcs_thread_without_a_task_on_the_event_loop(lone: RunningServer) -> None:
    """Every step of a tiny model's lone request (servicer, data plane, batcher, onnxruntime) runs in the call's
    thread: the loop creates no task for it (grpc.aio would create one per call)."""
    stub = lone.stub()
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    # Until the batcher has timed the model on its executor it does not run it inline; then it does.
    for _ in range(40):
        stub.ModelInfer(infer_request("dense", {"input": x}), timeout=30)
    created: list[object] = []
    counting = threading.Event()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **options: Any) -> asyncio.Task[Any]:
        if counting.is_set():
            created.append(coro)
        return asyncio.Task(coro, loop=loop, **options)

    async def set_factory(chosen: Any) -> None:
        asyncio.get_running_loop().set_task_factory(chosen)

    lone.call(set_factory(factory))
    counting.set()
    try:
        for _ in range(20):
            response = stub.ModelInfer(infer_request("dense", {"input": x}), timeout=30)
            np.testing.assert_allclose(output_arrays(response)["output"], dense_reference(x), atol=1e-6)
    finally:
        counting.clear()
        lone.call(set_factory(None))
    assert created == []


def test_a_lone_request_to_a_slow_model_runs_on_the_lent_instance_and_others_queue_behind_it(
    lone: RunningServer,
) -> None:
    """The lone request holds the model's only instance while it runs on its own thread; a request arriving then
    queues (it neither runs beside it nor is lost) and runs once the instance is back."""
    stub = lone.stub()
    executor = lone.app.repository.get("slow").executor
    wanted = {rows: output_arrays(stub.ModelInfer(infer_request("slow", {"input": BLOCKER[:rows]}), timeout=60))
              for rows in (64, 2)}
    first = stub.ModelInfer.future(infer_request("slow", {"input": BLOCKER}), timeout=120)
    wait_until(lambda: executor.in_flight_batches == 1, 30, "the lone request to be running")
    assert executor._lent  # on the instance lent to its thread, not a batch dispatched by the collector
    second = stub.ModelInfer.future(infer_request("slow", {"input": BLOCKER[:2]}), timeout=120)
    wait_until(lambda: executor.queue_depth == 1, 30, "the second request to queue")
    assert executor.in_flight_batches == 1  # never two runs on one instance
    np.testing.assert_allclose(output_arrays(first.result())["output"], wanted[64]["output"], atol=1e-5)
    np.testing.assert_allclose(output_arrays(second.result())["output"], wanted[2]["output"], atol=1e-5)
    assert executor.queue_depth == 0
    assert executor.in_flight_batches == 0


def test_a_call_that_waits_holds_a_grpc_thread_and_other_calls_still_get_answers(lone: RunningServer) -> None:
    """Calls waiting on the loop (queued behind a long batch) do not stop lone calls to another model."""
    stub = lone.stub()
    executor = lone.app.repository.get("slow").executor
    blocker = stub.ModelInfer.future(infer_request("slow", {"input": BLOCKER}), timeout=120)
    wait_until(lambda: executor.in_flight_batches == 1, 30, "the long batch to run")
    queued = [stub.ModelInfer.future(infer_request("slow", {"input": BLOCKER[:1]}), timeout=120) for _ in range(4)]
    x = np.ones((1, 3), dtype=np.float32)
    answers = [stub.ModelInfer(infer_request("dense", {"input": x}), timeout=30) for _ in range(5)]
    assert all(np.allclose(output_arrays(a)["output"], dense_reference(x), atol=1e-6) for a in answers)
    for future in [blocker, *queued]:
        future.result()


def test_health_watch_streams_status_changes_on_the_threaded_transport(lone: RunningServer) -> None:
    from grpc_health.v1 import health_pb2

    health = lone.health()
    stream = health.Watch(health_pb2.HealthCheckRequest(service="dense"), timeout=30)
    assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
    stream.cancel()
    with pytest.raises(grpc.RpcError) as unknown:
        health.Check(health_pb2.HealthCheckRequest(service="no-such-model"), timeout=30)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_requests_over_grpc_and_the_loop_share_one_model_safely(lone: RunningServer) -> None:
    """Callers on grpc's threads and coroutines on the loop (as the REST frontend's) hit one batcher at once; each
    gets exactly its own rows."""
    rng = np.random.default_rng(11)
    inputs = [rng.standard_normal((1 + i % 4, 3)).astype(np.float32) for i in range(60)]
    dataplane = lone.app.dataplane
    failures: list[BaseException] = []

    def over_grpc(xs: list[np.ndarray]) -> None:
        stub = lone.stub()
        try:
            for x in xs:
                got = output_arrays(stub.ModelInfer(infer_request("dense", {"input": x}), timeout=30))["output"]
                np.testing.assert_allclose(got, dense_reference(x), atol=1e-5)
        except BaseException as exc:  # reported below
            failures.append(exc)

    async def on_loop(xs: list[np.ndarray]) -> None:
        served = lone.app.repository.get("dense")
        for x in xs:
            outcome = await served.executor.submit({"input": x})
            np.testing.assert_allclose(outcome.outputs["output"], dense_reference(x), atol=1e-5)

    threads = [threading.Thread(target=over_grpc, args=(inputs[i::4],)) for i in range(3)]
    for thread in threads:
        thread.start()
    lone.call(on_loop(inputs[3::4]), timeout=60)
    for thread in threads:
        thread.join(60)
    assert not failures, failures
    assert dataplane.inflight == 0


def test_the_environment_variable_selects_the_threaded_transport_and_the_log_says_so(tmp_path: Path) -> None:
    """What makes the subprocess tests above run on this transport (NNSERVE_GRPC_TRANSPORT, set for each)."""
    write_model(tmp_path / "repo", "dense", dense_model(DENSE_W, DENSE_B), config={"max_batch_size": 8})
    with serve_process(tmp_path / "repo", tmp_path / "serve.log", "--device", "cpu") as served:
        with grpc.insecure_channel(served.address) as channel:
            from nnserve.protos import grpc_service_pb2_grpc as pb_grpc

            x = np.ones((2, 3), dtype=np.float32)
            response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request("dense", {"input": x}),
                                                                            timeout=30)
            np.testing.assert_allclose(output_arrays(response)["output"], dense_reference(x), atol=1e-6)
        served.terminate()
        assert served.process.wait(timeout=60) == 0
    assert "calls served by grpc's thread pool (64 threads; --grpc-transport threads)" in served.log()


def test_two_workers_share_the_port_and_sigterm_drains_both_on_the_threaded_transport(tmp_path: Path) -> None:
    """test_workers' check, waiting for both workers to be ready before it opens the connections (the kernel can
    only spread connections over listeners that exist; a slow second start must not fail the spread)."""
    repo = workers_repository(tmp_path / "repo")
    with serve_process(repo, tmp_path / "serve.log", "--workers", "2", "--grace-period", "20") as server:
        wait_until(lambda: len(worker_pids(server.log(), "ready: serving")) == 2, 60, "both workers' ready line")
        links = connections(server.address)
        try:
            rng = np.random.default_rng(5)
            for _channel, stub in links:
                x = rng.standard_normal((3, 3)).astype(np.float32)
                got = output_arrays(stub.ModelInfer(infer_request("dense", {"input": x}), timeout=30))["output"]
                np.testing.assert_allclose(got, dense_reference(x), rtol=1e-5, atol=1e-5)
            seen = [stub.ModelStatistics(pb.ModelStatisticsRequest(name="dense"), timeout=10).model_stats[0]
                    .inference_stats.success.count for _channel, stub in links]
            assert max(seen) < CONNECTIONS, f"every connection reached the same process: {seen}"
            x = rng.standard_normal((64, 512)).astype(np.float32)
            futures = [stub.ModelInfer.future(infer_request("slow", {"input": x}), timeout=60) for _c, stub in links]
            futures[0].result()
            server.terminate()
            answered, refusals = [], []
            for future in futures:
                try:
                    answered.append(output_arrays(future.result())["output"])
                except grpc.RpcError as error:
                    refusals.append((error.code(), error.details() or ""))
            for result in answered[1:]:
                np.testing.assert_allclose(result, answered[0], atol=1e-5)
            assert server.process.wait(timeout=40) == 0
        finally:
            for channel, _stub in links:
                channel.close()
        log = server.log()
    drained = [int(n) for n in re.findall(r"\] [\w.]+: shutting down: draining (\d+) accepted requests", log)]
    assert len(drained) == 2, log
    assert len(answered) >= sum(drained), "an accepted request was lost in the drain"
    assert len(answered) + len(refusals) == CONNECTIONS
    assert all(code == grpc.StatusCode.UNAVAILABLE and "shutting down" in text for code, text in refusals)
    assert "all 2 workers stopped" in log
    assert "still running when the grace period ended" not in log
