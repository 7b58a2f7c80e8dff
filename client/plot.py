"""`nnserve bench --plot`: throughput and latency percentiles against concurrency, as one PNG.

matplotlib is an optional extra, imported only here and only when a plot is asked for, so the client keeps no
plotting dependency.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from nnserve.client.bench import LevelResult

MISSING_MATPLOTLIB = "--plot needs matplotlib, which is not installed: pip install matplotlib"


def plotting_available() -> bool:
    """Whether matplotlib can be imported (checked before a benchmark runs, not after)."""
    return importlib.util.find_spec("matplotlib") is not None


def plot_levels(levels: Sequence[LevelResult], path: Path, title: str) -> None:
    """Two panels sharing the concurrency axis: rows/s, and p50/p90/p99 latency in ms."""
    import matplotlib  # optional dependency, imported lazily on purpose

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    concurrency = [level.concurrency for level in levels]
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    throughput.plot(concurrency, [level.rows_per_s for level in levels], marker="o", label="rows/s")
    throughput.plot(concurrency, [level.requests_per_s for level in levels], marker="s", label="requests/s")
    throughput.set(xlabel="concurrency", ylabel="per second", title="throughput", xscale="log")
    for name in ("p50_ms", "p90_ms", "p99_ms"):
        values = [getattr(level, name) for level in levels]
        latency.plot(concurrency, [v if v is not None else float("nan") for v in values], marker="o", label=name[:3])
    latency.set(xlabel="concurrency", ylabel="ms", title="latency", xscale="log")
    for axis in (throughput, latency):
        axis.set_xticks(concurrency, [str(c) for c in concurrency])
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
