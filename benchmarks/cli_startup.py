"""How long nnserve's own commands take to start and to end: `nnserve --version`, one `nnserve infer`, and how long
`nnserve serve` (alone and with `--workers 2`) takes to exit after its last log line.

    python benchmarks/cli_startup.py                       # ~1 minute; medians of --runs runs each
    python benchmarks/cli_startup.py --nnserve OTHER/bin/nnserve --runs 11 --json

Every figure is wall-clock time of a fresh process, median of `--runs` runs (min and max printed beside it):

* `--version`: the whole command, interpreter start included (the floor is `python -c pass`, printed too).
* `infer`: one request to a running server (started once, on a seed network) and its printed table.
* exit delay: from the moment the final log line of `serve` ("stopped; N inference requests ...", or the
  supervisor's "all N workers stopped") is read from its stderr to the moment the process has exited (waitpid).
  Each run starts a fresh server, sends it one request, waits for its "ready" line and sends SIGTERM.

`--nnserve` picks the command to time (default: the `nnserve` beside this interpreter), so the same script measures
another checkout's virtual environment, e.g. a worktree of an earlier commit. Servers listen on loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "examples" / "001_perceptron.json"
MODEL = "perceptron"
DATA = "[[0.5, 1.2, -0.3]]"
READY_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def timed(command: Sequence[str]) -> float:
    """Wall-clock seconds of one run of `command`; its output is discarded, a failure stops the benchmark."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return elapsed


class Serve:
    """`nnserve serve` on a free loopback port, its stderr lines read (and timestamped) as they arrive."""

    def __init__(self, nnserve: str, repository: Path, *extra: str) -> None:
        self.port = free_port()
        self.lines: list[tuple[float, str]] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            [nnserve, "serve", "--model-repository", str(repository), "--host", "127.0.0.1",
             "--grpc-port", str(self.port), "--http-port", "off", "--metrics-port", "off", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._changed.notify_all()
        with self._changed:
            self.lines.append((time.monotonic(), ""))  # EOF marker
            self._changed.notify_all()

    def wait_for(self, text: str, count: int = 1, timeout: float = READY_S) -> float:
        """When the `count`-th line containing `text` was read; fails when the server exits or the time is up."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [t for t, line in self.lines if text in line]
                if len(found) >= count:
                    return found[count - 1]
                if (self.lines and self.lines[-1][1] == "") or time.monotonic() > deadline:
                    log = "\n".join(line for _t, line in self.lines)
                    raise SystemExit(f"nnserve serve never logged {text!r}:\n{log}")
                self._changed.wait(timeout=max(0.0, deadline - time.monotonic()))

    def stop(self) -> float:
        """SIGTERM; the moment the process was seen to exit (waitpid returned)."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)
        exited = time.monotonic()
        self._reader.join(timeout=10)
        return exited

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def exit_delay(nnserve: str, repository: Path, workers: int) -> float:
    extra = ("--workers", str(workers)) if workers > 1 else ()
    server = Serve(nnserve, repository, *extra)
    try:
        server.wait_for("ready: serving", count=workers)
        timed([nnserve, "infer", MODEL, "--data", DATA, "--url", f"127.0.0.1:{server.port}"])
        exited = server.stop()
        final = "workers stopped" if workers > 1 else "stopped; "
        if server.process.returncode != 0:
            raise SystemExit(f"nnserve serve exited with {server.process.returncode}")
        return exited - server.wait_for(final, timeout=10)
    finally:
        server.kill()


def summary(values: list[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(values), 4), "min_s": round(min(values), 4),
            "max_s": round(max(values), 4), "runs": len(values)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nnserve", default=str(Path(sys.executable).parent / "nnserve"),
                        help="the nnserve command to time (default: the one beside this interpreter)")
    parser.add_argument("--runs", type=int, default=7, help="runs per figure (default 7)")
    parser.add_argument("--exit-runs", type=int, default=5, help="servers started per exit-delay figure (default 5)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    nnserve = args.nnserve
    python = str(Path(nnserve).resolve().parent / "python")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="nnserve-cli-bench-") as tmp:
        repository = Path(tmp) / "repo"
        subprocess.run([nnserve, "build", str(SPEC), "--model-repository", str(repository)], check=True,
                       capture_output=True, timeout=300)
        if Path(python).exists():
            results["python -c pass"] = summary([timed([python, "-c", "pass"]) for _ in range(args.runs)])
        results["nnserve --version"] = summary([timed([nnserve, "--version"]) for _ in range(args.runs)])
        server = Serve(nnserve, repository)
        try:
            server.wait_for("ready: serving")
            infer = [nnserve, "infer", MODEL, "--data", DATA, "--url", f"127.0.0.1:{server.port}"]
            timed(infer)  # the server's first request pays its own warm-up
            results["nnserve infer (one request)"] = summary([timed(infer) for _ in range(args.runs)])
            server.stop()
        finally:
            server.kill()
        for workers in (1, 2):
            name = "serve exit delay" + (f" (--workers {workers})" if workers > 1 else "")
            results[name] = summary([exit_delay(nnserve, repository, workers) for _ in range(args.exit_runs)])
    if args.json:
        print(json.dumps({"nnserve": nnserve, "results": results}, indent=2))
        return 0
    width = max(len(name) for name in results)
    print(f"{'what':<{width}}  median s  (min - max, runs)")
    for name, figures in results.items():
        print(f"{name:<{width}}  {figures['median_s']:8.3f}  ({figures['min_s']:.3f} - {figures['max_s']:.3f}, "
              f"{figures['runs']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
