"""Where a server's CPU per request goes, for `rest.py`: its event loop thread sampled with py-spy under load, the
samples grouped by the module they were in, scaled to that thread's CPU per request read from /proc.

py-spy runs `--nonblocking` (it reads the server's memory, never stops it) on the clients' CPUs. Its own idle
detection does not work here (threads waiting in a futex or in epoll are reported as running), so idle samples are
recognised by their innermost frame: the loop waiting in its selector's `poll`. Only the loop thread (the stacks
that start at the process's `<module>`, or in runpy's `_run_module_as_main` for `python -m`) is split by module;
the other threads (the batch's executor thread running onnxruntime, grpc's threads) are given as one figure from
/proc. A sample is attributed to the innermost frame whose file is in `CATEGORIES`, so time in the standard
library, numpy's Python wrappers or C functions (orjson, numpy, httptools) counts for the module that called it;
sockets and the loop's own bookkeeping are `asyncio`.

Shares are shares of samples, that is of the thread's time running or runnable; on a machine shared with other work
a thread also waits runnable while another process has its core, so the split is approximate where the total (from
/proc) is exact.
"""

from __future__ import annotations

import contextlib
import linecache
import os
import selectors
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

CATEGORIES: tuple[tuple[str, str], ...] = (
    ("onnxruntime/", "onnxruntime (Session.run)"),
    ("frontends/rest_codec.py", "REST codec: parse request, encode response (orjson, numpy)"),
    ("frontends/rest_http.py", "REST body reading, hang-up watch"),
    ("frontends/rest.py", "REST routes and replies"),
    ("frontends/grpc_", "gRPC servicer and payload codec"),
    ("server/decode_guard.py", "gRPC decoding guard"),
    ("server/dataplane.py", "data plane (lookup, checks, budget, timing)"),
    ("server/tensors.py", "data plane (lookup, checks, budget, timing)"),
    ("server/inflight_budget.py", "data plane (lookup, checks, budget, timing)"),
    ("server/batch", "batcher (queue, policy, merge, split)"),
    ("server/precise_timer.py", "batcher (queue, policy, merge, split)"),
    ("server/runner.py", "runner"),
    ("server/statistics.py", "statistics and metrics"),
    ("server/metrics.py", "statistics and metrics"),
    ("server/", "nnserve, other modules"),
    ("http_echo_server.py", "echo handler (orjson, numpy)"),
    ("uvicorn/", "uvicorn + httptools (HTTP parsing, response head)"),
    ("grpc/", "grpc.aio"),
    ("concurrent/futures/", "hand-off to the executor thread"),
    ("asyncio/", "asyncio: loop, sockets, tasks, futures"),
    ("selectors.py", "asyncio: loop, sockets, tasks, futures"),
)
"""(a fragment of a frame's file path, its group): the first that matches, from the innermost frame outwards."""
OTHER = "other Python"


def thread_cpu_seconds(pid: int, tid: int) -> float:
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return 0.0


def _is_idle(frame: str) -> bool:
    """The loop thread waiting for events: its selector's `poll` line (read from this interpreter's selectors.py,
    which is the servers' too)."""
    where = frame.rpartition(" (")[2]
    path, _, line = where.rstrip(")").rpartition(":")
    if not path.endswith("selectors.py") or not line.isdigit():
        return False
    return "poll(" in linecache.getline(selectors.__file__, int(line))


def _group(frames: list[str]) -> str:
    for frame in reversed(frames):
        where = frame.rpartition(" (")[2]
        for fragment, label in CATEGORIES:
            if fragment in where:
                return label
    return OTHER


def loop_thread_split(raw: str) -> tuple[Counter[str], int, int]:
    """(active samples of the loop thread by group, its active samples, its idle samples) from py-spy's raw output
    (one line per stack: frames outermost first, separated by ';', then the count)."""
    groups: Counter[str] = Counter()
    idle = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        if not frames[0].startswith(("<module>", "_run_module_as_main")):
            continue  # another thread (its bottom frame is threading's _bootstrap); `python -m` starts in runpy
        if _is_idle(frames[-1]):
            idle += int(count)
        else:
            groups[_group(frames)] += int(count)
    return groups, sum(groups.values()), idle


def profile(py_spy: Path, pid: int, tree: list[int], client: list[str], env: dict[str, str] | None, skip_s: float,
            seconds: float, cpu_seconds: Any) -> dict[str, Any]:
    """Run `client` (its load lasting at least `skip_s + seconds + 1`), sample the server `pid` for `seconds` after
    `skip_s`, and return the CPU per second of the whole tree and of the loop thread over that window, with the loop
    thread's samples by group; the caller divides by the request rate. `cpu_seconds(tree)` reads the tree's CPU."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.TemporaryDirectory() as folder:
        raw_file = Path(folder) / "samples.txt"
        process = subprocess.Popen(client, stdout=out, stderr=err, text=True, env=env)
        try:
            time.sleep(skip_s)
            started, tree_before, loop_before = time.monotonic(), cpu_seconds(tree), thread_cpu_seconds(pid, pid)
            spy = subprocess.run([str(py_spy), "record", "--nonblocking", "--format", "raw", "--rate", "500",
                                  "--duration", str(int(seconds)), "--pid", str(pid), "--output", str(raw_file)],
                                 capture_output=True, text=True, timeout=seconds + 60)
            ended, tree_after, loop_after = time.monotonic(), cpu_seconds(tree), thread_cpu_seconds(pid, pid)
            process.wait(timeout=seconds * 4 + 60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        out.seek(0)
        err.seek(0)
        client_stdout, client_stderr = out.read(), err.read()
        if spy.returncode != 0 or not raw_file.exists():
            return {"error": f"py-spy exited {spy.returncode}: {(spy.stderr or spy.stdout).strip()[-300:]}"}
        groups, active, idle = loop_thread_split(raw_file.read_text())
    elapsed = ended - started
    return {"client_stdout": client_stdout, "client_stderr": client_stderr, "client_status": process.returncode,
            "window_s": elapsed,
            "tree_cores": (tree_after - tree_before) / elapsed, "loop_cores": (loop_after - loop_before) / elapsed,
            "loop_samples_by_group": dict(groups.most_common()), "loop_active_samples": active,
            "loop_idle_samples": idle}
