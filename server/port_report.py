"""What a starting server bound, for whoever started it: one log line, and the `--port-file` JSON.

`--grpc-port 0` and `--metrics-port 0` let the kernel pick free ports, which only the server then knows. Instead of
parsing the log, a supervisor (a test, a benchmark, a sidecar) passes `--port-file FILE` and waits for FILE: it
appears, complete, once every listener is bound and before the models load, so that the caller can wait on the
health service from then on. It is written to a temporary file in the same folder and renamed over FILE, so a reader
never sees half of it, and removed when the server stops (a file left behind by a killed server names its `pid`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def port_report(*, pid: int, host: str, grpc: int, http: int | None, metrics: int | None) -> dict[str, object]:
    """The port file's content (`http`, `metrics`: null when off)."""
    return {"pid": pid, "host": host, "grpc": grpc, "http": http, "metrics": metrics}


def log_ports(grpc: int, http: int | None, metrics: int | None) -> None:
    """The documented start-up line `ports: grpc=8001 http=8000 metrics=8002` (`off` for a disabled one)."""
    log.info("ports: grpc=%d http=%s metrics=%s", grpc, "off" if http is None else http,
             "off" if metrics is None else metrics)


def write_port_file(path: Path, report: dict[str, object]) -> None:
    """Write `report` as JSON to `path` atomically (temporary file in the same folder, then `os.replace`)."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as stream:
            stream.write(json.dumps(report) + "\n")
        os.chmod(temporary, 0o644)  # ports are no secret; mkstemp makes the file private to the user
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def remove_port_file(path: Path, pid: int) -> None:
    """Remove the port file at exit, unless another server (another pid) has written it since."""
    path = Path(path)
    try:
        if json.loads(path.read_text()).get("pid") != pid:
            return
        path.unlink()
    except (OSError, ValueError, AttributeError) as exc:
        log.debug("port file %s not removed: %s", path, exc)
