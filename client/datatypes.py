"""Protocol datatype strings <-> numpy dtypes.

The wire carries little-endian raw bytes (KServe v2), so every dtype here is explicitly little-endian: a big-endian
array is byte-swapped once on the way out, and responses are viewed, never converted, on the way in.
"""

from __future__ import annotations

import numpy as np

from nnserve.client.errors import InvalidInputError
from nnserve.protos.datatypes import NUMPY_BY_DATATYPE

_NUMPY_BY_DATATYPE = NUMPY_BY_DATATYPE

_DATATYPE_BY_KIND_SIZE: dict[tuple[str, int], str] = {
    (dtype.kind, dtype.itemsize): name for name, dtype in _NUMPY_BY_DATATYPE.items() if name != "BYTES"
}

DATATYPES: tuple[str, ...] = tuple(_NUMPY_BY_DATATYPE)
"""Every protocol datatype the client can send and receive."""


def to_numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype (little-endian) for a protocol datatype; BYTES maps to `object` (elements are `bytes`)."""
    try:
        return _NUMPY_BY_DATATYPE[datatype]
    except KeyError:
        raise InvalidInputError(f"unsupported datatype {datatype!r}; expected one of {', '.join(DATATYPES)}") from None


def to_datatype(dtype: np.dtype) -> str:
    """The protocol datatype for a numpy dtype; `object`, `bytes_` and `str_` arrays travel as BYTES."""
    if dtype.kind in "OSU":
        return "BYTES"
    try:
        return _DATATYPE_BY_KIND_SIZE[(dtype.kind, dtype.itemsize)]
    except KeyError:
        raise InvalidInputError(
            f"numpy dtype {dtype} has no protocol datatype; use one of bool, (u)int8-64, float16/32/64 or bytes"
        ) from None
