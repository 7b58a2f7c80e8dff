"""Merging requests into a batch and splitting its outputs back: the pure functions under the dynamic batcher.

No asyncio, no onnxruntime: numpy arrays in, numpy arrays out, so that the rules every caller's rows depend on are
tested alone (`tests/test_batcher_properties.py` property-tests them with hypothesis). A batch is the concatenation
of its requests along axis 0, in arrival order; request i owns rows `offsets[i]:offsets[i + 1]` of every output.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from nnserve.server.errors import ExecutionError, InvalidInputError

BatchKey = tuple[tuple[str, np.dtype, tuple[int, ...]], ...]
"""Input names with their dtypes and non-batch shapes: only requests with equal keys can be concatenated."""


def request_rows(inputs: Mapping[str, np.ndarray]) -> int:
    """Rows of a request, i.e. its axis 0, which must be the same (and >= 1) for every input."""
    if not inputs:
        raise InvalidInputError("the request has no inputs")
    rows: int | None = None
    first = ""
    for name, array in inputs.items():
        if array.ndim == 0:
            raise InvalidInputError(f"input '{name}' is a scalar; a batched model needs a batch dimension (axis 0)")
        if rows is None:
            rows, first = array.shape[0], name
        elif array.shape[0] != rows:
            raise InvalidInputError(
                f"input '{name}' has {array.shape[0]} rows but input '{first}' has {rows}; "
                "all inputs of a request need the same batch dimension (axis 0)"
            )
    if not rows:
        raise InvalidInputError("the request has 0 rows; send at least one row")
    return rows


def batch_key(inputs: Mapping[str, np.ndarray]) -> BatchKey:
    """The compatibility key: names, dtypes and shapes after axis 0 (names are unique, so sorting is total)."""
    return tuple(sorted((name, array.dtype, array.shape[1:]) for name, array in inputs.items()))


def row_offsets(rows: Sequence[int]) -> list[int]:
    """`[0, r0, r0 + r1, ..., total]`: request i owns rows `offsets[i]:offsets[i + 1]` of the batch."""
    return list(itertools.accumulate(rows, initial=0))


def merge_inputs(requests: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate requests with one batch key along axis 0; a lone request is passed through without a copy."""
    if len(requests) == 1:
        return dict(requests[0])
    return {name: np.concatenate([request[name] for request in requests], axis=0) for name in requests[0]}


def split_outputs(outputs: Mapping[str, np.ndarray], rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Give each request its rows of every output, refusing outputs whose row count is not the batch's.

    A model that drops or adds rows would silently hand one caller another caller's results, so that is an
    ExecutionError for the whole batch rather than a best-effort split.
    """
    if not isinstance(outputs, Mapping):
        raise ExecutionError(f"the model returned {type(outputs).__name__}, expected a mapping of output arrays")
    offsets = row_offsets(rows)
    total = offsets[-1]
    arrays: dict[str, np.ndarray] = {}
    for name, value in outputs.items():
        array = np.asarray(value)
        if array.ndim == 0 or array.shape[0] != total:
            found = "a scalar" if array.ndim == 0 else f"{array.shape[0]} rows"
            raise ExecutionError(f"output '{name}' has {found} for a batch of {total} input rows")
        arrays[name] = array
    return [{name: array[start:stop] for name, array in arrays.items()} for start, stop in itertools.pairwise(offsets)]


def own_outputs(outputs: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """The outputs of a batch that is one request: all of them, once checked like `split_outputs` checks them."""
    if type(outputs) is dict and all(type(a) is np.ndarray and a.ndim and a.shape[0] == rows for a in outputs.values()):
        return outputs
    (part,) = split_outputs(outputs, (rows,))
    return part


@dataclass(slots=True)
class BatchBuilder:
    """Admission rules of one forming batch, apart from the asyncio code so that they can be tested alone."""

    max_rows: int
    preferred_sizes: frozenset[int] = frozenset()
    key: Hashable = None
    rows: int = 0
    requests: int = 0

    def accepts(self, key: Hashable, rows: int) -> bool:
        """Whether a request fits: the batch's key, and the rows still free (a request is never split)."""
        if self.requests == 0:
            return rows <= self.max_rows
        return key == self.key and self.rows + rows <= self.max_rows

    def add(self, key: Hashable, rows: int) -> None:
        """Admit a request that `accepts` allowed."""
        if not self.accepts(key, rows):
            raise ValueError(f"a request of {rows} rows does not fit this batch ({self.rows}/{self.max_rows} rows)")
        self.key = key
        self.rows += rows
        self.requests += 1

    @property
    def full(self) -> bool:
        """No further row fits."""
        return self.rows >= self.max_rows

    @property
    def at_preferred_size(self) -> bool:
        """The batch has a preferred row count, so it may close without waiting."""
        return self.rows in self.preferred_sizes
