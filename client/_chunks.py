"""Splitting a large input along axis 0 into request-sized chunks, and putting the answers back together in order.

Both clients' `infer_many` use these; only how chunks are kept in flight (threads vs tasks) differs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nnserve.client.errors import InvalidInputError


def row_count(inputs: Mapping[str, Any]) -> int:
    """The common axis-0 length of every input; differing lengths cannot be split consistently."""
    if not inputs or any(np.ndim(value) == 0 for value in inputs.values()):
        raise InvalidInputError("infer_many needs inputs with at least one dimension (the rows to split)")
    lengths = {name: int(np.shape(value)[0]) for name, value in inputs.items()}
    if len(set(lengths.values())) != 1:
        raise InvalidInputError(f"infer_many needs the same number of rows in every input, got {lengths}")
    return next(iter(lengths.values()))


def request_rows(batch_size: int, config: Any | None) -> int | None:
    """Rows per request: `batch_size`, lowered to the model's `max_batch_size` (a ModelConfig, when known); None
    for a model without a batch dimension (max_batch_size 0), which takes the whole input in one request."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    limit = int(config.max_batch_size) if config is not None else None
    if limit == 0:
        return None
    return batch_size if limit is None else min(batch_size, limit)


def split(inputs: Mapping[str, Any], batch_size: int | None) -> list[dict[str, np.ndarray]]:
    """Views of consecutive `batch_size`-row slices (the last may be shorter), or the whole input as one chunk when
    `batch_size` is None; nothing is copied here."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    arrays = {name: np.asarray(value) for name, value in inputs.items()}
    rows = row_count(arrays)
    if batch_size is None:
        return [arrays]
    return [{name: a[start : start + batch_size] for name, a in arrays.items()} for start in range(0, rows, batch_size)]


def assemble(parts: Sequence[np.ndarray | dict[str, np.ndarray]]) -> np.ndarray | dict[str, np.ndarray]:
    """Concatenate per-chunk results along axis 0, keeping the chunk order (and output names for dicts)."""
    if not parts:
        raise InvalidInputError("infer_many got no rows to infer")
    first = parts[0]
    if isinstance(first, dict):
        return {name: np.concatenate([part[name] for part in parts]) for name in first}  # type: ignore[index]
    return np.concatenate(parts)  # type: ignore[arg-type]
