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


def split(inputs: Mapping[str, Any], batch_size: int) -> list[dict[str, np.ndarray]]:
    """Views of consecutive `batch_size`-row slices (the last may be shorter); nothing is copied here."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    arrays = {name: np.asarray(value) for name, value in inputs.items()}
    rows = row_count(arrays)
    return [{name: a[start : start + batch_size] for name, a in arrays.items()} for start in range(0, rows, batch_size)]


def assemble(parts: Sequence[np.ndarray | dict[str, np.ndarray]]) -> np.ndarray | dict[str, np.ndarray]:
    """Concatenate per-chunk results along axis 0, keeping the chunk order (and output names for dicts)."""
    if not parts:
        raise InvalidInputError("infer_many got no rows to infer")
    first = parts[0]
    if isinstance(first, dict):
        return {name: np.concatenate([part[name] for part in parts]) for name in first}  # type: ignore[index]
    return np.concatenate(parts)  # type: ignore[arg-type]
