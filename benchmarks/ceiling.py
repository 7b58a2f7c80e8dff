"""The compute ceiling: onnxruntime `InferenceSession.run` in this process, no server, at given batch sizes.

Measured twice, and the better one is the ceiling: with the server's own session options (intra-op threads from
the CPU quota, no spinning) and with onnxruntime's defaults. Prints one JSON object:
`{"<batch>": {"rows_per_s": ..., "median_ms": ..., "options": ...}}`.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort


def session(path: str, server_options: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if server_options:
        from nnserve.server.cpu_quota import intra_op_threads

        options.intra_op_num_threads = intra_op_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def measure(sess: ort.InferenceSession, batch: int, seconds: float) -> tuple[float, float]:
    """(rows per second, median milliseconds per run) over `seconds` of back-to-back runs."""
    spec = sess.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal((batch, int(spec.shape[1]))).astype(np.float32)
    feed = {spec.name: x}
    for _ in range(3):
        sess.run(None, feed)
    times = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(times) < 5:
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    median = float(np.median(times))
    return batch / median, median * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    result: dict[str, dict[str, object]] = {}
    sessions = {"server options": session(args.model, True), "onnxruntime defaults": session(args.model, False)}
    for batch in (int(b) for b in args.batches.split(",")):
        best: dict[str, object] | None = None
        for name, sess in sessions.items():
            rows_per_s, median_ms = measure(sess, batch, args.seconds / 2)
            if best is None or rows_per_s > best["rows_per_s"]:  # type: ignore[operator]
                best = {"rows_per_s": rows_per_s, "median_ms": median_ms, "options": name}
        result[str(batch)] = best  # type: ignore[assignment]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
