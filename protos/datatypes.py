"""KServe v2 tensor datatypes and their numpy dtypes: one table for the server and the client.

Raw contents are little-endian on the wire, so every dtype here is explicitly little-endian.
"""

from __future__ import annotations

from typing import Any

import numpy as np

NUMPY_BY_DATATYPE: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
"""Every datatype the protocol defines that numpy can hold (BF16 has no numpy dtype); BYTES elements are `bytes`."""
