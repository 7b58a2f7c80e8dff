"""Property-based tests of the batch merge/split helpers and of how a backlog is cut into batches.

Merge and split decide which caller gets which numbers, so they are checked over random row counts, trailing
shapes, dtypes and input names rather than a few hand-picked cases.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nnserve.server.batcher import (
    BatchBuilder,
    BatchOutcome,
    DynamicBatcher,
    batch_key,
    merge_inputs,
    request_rows,
    row_offsets,
    split_outputs,
)
from nnserve.server.batching_settings import BatchingSettings
from nnserve.server.errors import ExecutionError, InvalidInputError

pytestmark = pytest.mark.timeout(120)

UNTIMED = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
"""Hypothesis' defaults time each example (200 ms) and the data generation: a busy machine fails them, not a bug."""

DTYPES = [np.float32, np.float64, np.float16, np.int8, np.int32, np.int64, np.uint16, np.bool_]

row_counts = st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=10)
trailing_shapes = st.lists(st.integers(min_value=0, max_value=3), max_size=2).map(tuple)
input_specs = st.dictionaries(
    keys=st.sampled_from(["x", "mask", "ids"]),
    values=st.tuples(st.sampled_from(DTYPES), trailing_shapes),
    min_size=1,
)


def make_requests(specs: dict[str, tuple[Any, tuple[int, ...]]], rows: list[int]) -> list[dict[str, np.ndarray]]:
    """Requests of one batch key whose every element is distinct (within the dtype's range), so a misplaced row
    shows; bool inputs alternate."""
    requests = []
    counter = 0
    for count in rows:
        request = {}
        for name, (dtype, trailing) in specs.items():
            size = count * int(np.prod(trailing, dtype=np.int64))
            values = np.arange(counter, counter + size) % 100 if dtype != np.bool_ else np.arange(size) % 2
            request[name] = values.reshape((count, *trailing)).astype(dtype)
            counter += size
        requests.append(request)
    return requests


@UNTIMED
@given(specs=input_specs, rows=row_counts)
def test_split_of_merge_returns_exactly_each_requests_rows(
    specs: dict[str, tuple[Any, tuple[int, ...]]], rows: list[int]
) -> None:
    requests = make_requests(specs, rows)
    merged = merge_inputs(requests)
    assert {name: array.shape[0] for name, array in merged.items()} == dict.fromkeys(specs, sum(rows))
    parts = split_outputs(merged, rows)
    assert len(parts) == len(requests)
    for request, part in zip(requests, parts, strict=True):
        assert part.keys() == request.keys()
        for name, array in request.items():
            assert part[name].dtype == array.dtype
            assert part[name].shape == array.shape
            np.testing.assert_array_equal(part[name], array)


@UNTIMED
@given(rows=row_counts)
def test_row_offsets_start_at_zero_step_by_each_request_and_end_at_the_total(rows: list[int]) -> None:
    offsets = row_offsets(rows)
    assert offsets[0] == 0
    assert offsets[-1] == sum(rows)
    assert [stop - start for start, stop in itertools.pairwise(offsets)] == rows


@UNTIMED
@given(rows=row_counts, delta=st.integers(min_value=-3, max_value=3).filter(bool))
def test_split_refuses_outputs_whose_rows_differ_from_the_inputs(rows: list[int], delta: int) -> None:
    total = sum(rows)
    outputs = {"y": np.zeros((max(total + delta, 0), 2))}
    with pytest.raises(ExecutionError, match=f"output 'y' has {max(total + delta, 0)} rows"):
        split_outputs(outputs, rows)


@UNTIMED
@given(specs=input_specs, rows=st.integers(min_value=1, max_value=5))
def test_request_rows_is_the_shared_axis_0(specs: dict[str, tuple[Any, tuple[int, ...]]], rows: int) -> None:
    (request,) = make_requests(specs, [rows])
    assert request_rows(request) == rows
    if len(request) > 1:
        name = next(iter(request))
        request[name] = np.concatenate([request[name], request[name][:1]])
        with pytest.raises(InvalidInputError, match="same batch dimension"):
            request_rows(request)


@UNTIMED
@given(first=input_specs, second=input_specs, rows=st.tuples(st.integers(1, 4), st.integers(1, 4)))
def test_batch_key_is_equal_exactly_when_names_dtypes_and_trailing_shapes_match(
    first: dict[str, tuple[Any, tuple[int, ...]]],
    second: dict[str, tuple[Any, tuple[int, ...]]],
    rows: tuple[int, int],
) -> None:
    (a,) = make_requests(first, [rows[0]])
    (b,) = make_requests(second, [rows[1]])
    same_layout = {n: (np.dtype(d), s) for n, (d, s) in first.items()} == {
        n: (np.dtype(d), s) for n, (d, s) in second.items()
    }
    assert (batch_key(a) == batch_key(b)) == same_layout


@UNTIMED
@given(
    items=st.lists(st.tuples(st.sampled_from("abc"), st.integers(1, 8)), min_size=1, max_size=30),
    max_rows=st.integers(1, 16),
)
def test_batch_builder_admits_only_one_key_and_never_more_than_max_rows(
    items: list[tuple[str, int]], max_rows: int
) -> None:
    builder = BatchBuilder(max_rows)
    for key, rows in items:
        fits = builder.requests == 0 or (key == builder.key and builder.rows + rows <= max_rows)
        assert builder.accepts(key, rows) == (fits and rows <= max_rows)
        if builder.accepts(key, rows):
            builder.add(key, rows)
        else:
            with pytest.raises(ValueError, match="does not fit"):
                builder.add(key, rows)
        assert builder.rows <= max_rows
        assert builder.full == (builder.rows == max_rows)


# -- the real batcher cutting a backlog: everything queued at once, no delay, one instance -------------------------

KEYS = [(np.float64, 3), (np.float64, 2), (np.float32, 3)]
backlogs = st.lists(st.tuples(st.integers(0, len(KEYS) - 1), st.integers(1, 6)), min_size=1, max_size=40)


def echo_with_sum(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A model whose outputs prove row ownership exactly: the input itself and a per-row reduction."""
    x = inputs["x"]
    return {"echo": x.copy(), "total": x.sum(axis=1)}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(backlog=backlogs, max_rows=st.integers(6, 12))
def test_backlog_is_cut_in_arrival_order_into_maximal_single_key_batches(
    backlog: list[tuple[int, int]], max_rows: int
) -> None:
    batches: list[np.ndarray] = []

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batches.append(inputs["x"].copy())
        return echo_with_sum(inputs)

    requests = [
        (np.full((rows, KEYS[key][1]), index) + np.arange(rows)[:, None] / 10).astype(KEYS[key][0])
        for index, (key, rows) in enumerate(backlog)
    ]

    async def main() -> list[BatchOutcome]:
        batcher = DynamicBatcher(run, BatchingSettings(max_batch_size=max_rows, max_queue_delay_us=0))
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit({"x": x}) for x in requests))
        finally:
            await batcher.stop()

    outcomes = asyncio.run(main())

    for x, outcome in zip(requests, outcomes, strict=True):
        np.testing.assert_array_equal(outcome.outputs["echo"], x)
        np.testing.assert_array_equal(outcome.outputs["total"], x.sum(axis=1))
    # Which requests each batch held, recovered from the rows the model saw.
    members = [sorted({int(v) for v in batch[:, 0]}) for batch in batches]
    assert [i for group in members for i in group] == list(range(len(backlog))), "not a partition in arrival order"
    for group in members:
        assert len({backlog[i][0] for i in group}) == 1, "two batch keys shared a batch"
        assert sum(backlog[i][1] for i in group) <= max_rows
    for current, following in itertools.pairwise(members):
        nxt = following[0]
        same_key = backlog[nxt][0] == backlog[current[0]][0]
        fits = sum(backlog[i][1] for i in current) + backlog[nxt][1] <= max_rows
        assert not (same_key and fits), "a batch closed although the next queued request fitted it"
