"""JSON codecs for the v2 REST path, in-process: stdlib `json`, `ujson` and `orjson` on v2 request and response bodies.

    python benchmarks/http_codecs.py [--quick]     # JSON on stdout; run by http_stack.py in its own venv

For a float32 tensor of 4, 1024 and 65536 elements it times, per call (median over repeats, each repeat looped for
at least `--min-time` seconds): parsing the request body (`loads`), turning the parsed list into the array
(`np.asarray(data, dtype=np.float32)`, the same for every codec but timed on each one's list), and serializing the
response, through `.tolist()` for every codec and, for orjson, from the array itself (`OPT_SERIALIZE_NUMPY`).
The request bodies are what tritonclient's HTTP client sends for float32 data (each value as the Python float it
widens to: `0.5488135218620300` rather than `0.54881352`), so parsing is timed on realistic digit counts.

It also records what each codec does with NaN and infinities (v2 JSON has no NaN), with `null` in a float tensor
(numpy turns it into NaN) and which numpy arrays orjson serializes directly (float16, bool, int8..uint64, and the
non-contiguous and big-endian cases it refuses).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import ujson

SIZES = (4, 1024, 65536)


def request_body(n: int, rng: np.random.Generator) -> bytes:
    data = rng.standard_normal(n).astype(np.float32)
    request = {"inputs": [{"name": "input", "shape": [1, n], "datatype": "FP32", "data": data.tolist()}]}
    return json.dumps(request).encode()


def response(array: np.ndarray, data: object) -> dict[str, Any]:
    return {"model_name": "echo", "outputs": [
        {"name": "output", "shape": list(array.shape), "datatype": "FP32", "data": data}]}


def per_call(fn: Callable[[], object], min_time: float, repeats: int) -> float:
    """Median seconds per call over `repeats` batches, each looped for at least `min_time`."""
    loops = 1
    while True:
        started = time.perf_counter()
        for _ in range(loops):
            fn()
        elapsed = time.perf_counter() - started
        if elapsed >= min_time:
            break
        loops = max(loops * 2, int(loops * min_time / max(elapsed, 1e-9) * 1.1))
    samples = [elapsed / loops]
    for _ in range(repeats - 1):
        started = time.perf_counter()
        for _ in range(loops):
            fn()
        samples.append((time.perf_counter() - started) / loops)
    return statistics.median(samples)


CODECS: dict[str, tuple[Callable[[bytes], Any], Callable[[Any], bytes]]] = {
    "json": (json.loads, lambda value: json.dumps(value, separators=(",", ":")).encode()),
    "ujson": (ujson.loads, lambda value: ujson.dumps(value).encode()),
    "orjson": (orjson.loads, orjson.dumps),
}


def timings(min_time: float, repeats: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    records = []
    for n in SIZES:
        body = request_body(n, rng)
        reference = np.asarray(json.loads(body)["inputs"][0]["data"], dtype=np.float32).reshape(1, n)
        tolist_s = per_call(lambda: reference.ravel().tolist(), min_time, repeats)  # noqa: B023
        for name, (loads, dumps) in CODECS.items():
            parsed = loads(body)
            data = parsed["inputs"][0]["data"]
            array = np.asarray(data, dtype=np.float32).reshape(1, n)
            record: dict[str, Any] = {
                "elements": n, "codec": name, "request_bytes": len(body),
                "parse_us": per_call(lambda: loads(body), min_time, repeats) * 1e6,  # noqa: B023
                "asarray_us": per_call(lambda: np.asarray(data, dtype=np.float32), min_time, repeats) * 1e6,  # noqa: B023
                "same_array_as_json": bool(np.array_equal(array, reference)),
                "tolist_us": tolist_s * 1e6,
                "encode_tolist_us": per_call(
                    lambda: dumps(response(array, array.ravel().tolist())), min_time, repeats) * 1e6,  # noqa: B023
                "response_bytes_tolist": len(dumps(response(array, array.ravel().tolist()))),
            }
            if name == "orjson":
                def numpy_dumps(array: np.ndarray = array) -> bytes:
                    return orjson.dumps(response(array, array.ravel()), option=orjson.OPT_SERIALIZE_NUMPY)

                record["encode_numpy_us"] = per_call(numpy_dumps, min_time, repeats) * 1e6
                record["response_bytes_numpy"] = len(numpy_dumps())
                back = np.asarray(orjson.loads(numpy_dumps())["outputs"][0]["data"], dtype=np.float32)
                record["numpy_round_trip_exact"] = bool(np.array_equal(back, array.ravel()))
            best_encode = min(record["encode_tolist_us"], record.get("encode_numpy_us", float("inf")))
            record["round_trip_us"] = record["parse_us"] + record["asarray_us"] + best_encode
            records.append(record)
    return records


def _outcome(fn: Callable[[], object]) -> str:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = fn()
        text = value.decode() if isinstance(value, bytes) else repr(value)
        return text + (f" (warning: {caught[0].message})" if caught else "")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def non_finite() -> dict[str, dict[str, str]]:
    """What each codec writes for NaN/Inf and reads for NaN, Infinity, 1e999 and null (and numpy's view of those)."""
    nan, inf = float("nan"), float("inf")
    out: dict[str, dict[str, str]] = {}
    for name, (loads, dumps) in CODECS.items():
        out[name] = {
            "dumps [nan, inf, -inf]": _outcome(lambda: dumps([nan, inf, -inf])),  # noqa: B023
            "loads '[NaN]'": _outcome(lambda: loads(b"[NaN]")),  # noqa: B023
            "loads '[Infinity]'": _outcome(lambda: loads(b"[Infinity]")),  # noqa: B023
            "loads '[1e999]'": _outcome(lambda: loads(b"[1e999]")),  # noqa: B023
            "loads '[1e39]' -> float32": _outcome(
                lambda: np.asarray(loads(b"[1e39]"), dtype=np.float32)),  # noqa: B023
            "loads '[1.5, null]' -> float32": _outcome(
                lambda: np.asarray(loads(b"[1.5, null]"), dtype=np.float32)),  # noqa: B023
            "loads '[1, null]' -> int32": _outcome(
                lambda: np.asarray(loads(b"[1, null]"), dtype=np.int32)),  # noqa: B023
        }
    out["json"]["dumps allow_nan=False"] = _outcome(lambda: json.dumps([nan], allow_nan=False))
    out["orjson"]["dumps float32 array [nan, inf] (numpy)"] = _outcome(
        lambda: orjson.dumps(np.array([nan, inf], dtype=np.float32), option=orjson.OPT_SERIALIZE_NUMPY))
    return out


def numpy_types() -> dict[str, str]:
    """What orjson's OPT_SERIALIZE_NUMPY writes for each v2 datatype's numpy array, and the arrays it refuses."""
    cases: dict[str, np.ndarray] = {
        "float16": np.array([0.1, -2.5, 65504], dtype=np.float16),
        "float32": np.array([0.1, -2.5, 3.4e38], dtype=np.float32),
        "float64": np.array([0.1, -2.5, 1e308], dtype=np.float64),
        "bool": np.array([True, False]),
    }
    for kind in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"):
        info = np.iinfo(kind)
        cases[kind] = np.array([info.min, 0, info.max], dtype=kind)
    cases["float32 2-D [[1,2],[3,4]]"] = np.array([[1, 2], [3, 4]], dtype=np.float32)
    cases["float32 non-contiguous (a[:, 0])"] = np.arange(6, dtype=np.float32).reshape(3, 2)[:, 0]
    cases["float32 big-endian ('>f4')"] = np.array([1.5, 2.5], dtype=">f4")
    cases["float32 0-d"] = np.array(1.5, dtype=np.float32)
    def serialized(array: np.ndarray) -> Callable[[], bytes]:
        return lambda: orjson.dumps(array, option=orjson.OPT_SERIALIZE_NUMPY)

    out = {name: _outcome(serialized(array)) for name, array in cases.items()}
    out["float32 scalar np.float32(0.1)"] = _outcome(
        lambda: orjson.dumps(np.float32(0.1), option=orjson.OPT_SERIALIZE_NUMPY))
    out["float32 array without OPT_SERIALIZE_NUMPY"] = _outcome(lambda: orjson.dumps(cases["float32"]))
    out["ujson float32 array"] = _outcome(lambda: ujson.dumps(cases["float32"]))
    out["json float32 array"] = _outcome(lambda: json.dumps(cases["float32"]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter timing loops")
    parser.add_argument("--min-time", type=float, help="seconds per timed batch (default 0.05, quick 0.02)")
    parser.add_argument("--repeats", type=int, help="batches per figure (default 7, quick 3)")
    args = parser.parse_args()
    min_time = args.min_time or (0.02 if args.quick else 0.05)
    repeats = args.repeats or (3 if args.quick else 7)
    result = {"min_time_s": min_time, "repeats": repeats, "timings": timings(min_time, repeats),
              "non_finite": non_finite(), "orjson_numpy": numpy_types(),
              "versions": {"orjson": orjson.__version__, "ujson": ujson.__version__, "numpy": np.__version__}}
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
