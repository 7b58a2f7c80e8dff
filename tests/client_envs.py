"""Separate virtual environments for third-party clients whose dependencies nnserve's own environment should not carry.

`kserve` (its REST client and pydantic data models) pulls in fastapi, uvicorn, pandas and the kubernetes client: on the
2-core machine, pip's cache warm, it added 68-115 s (45 packages, 300 MiB) to every fresh `pip install '.[test]'`
(140-160 s without it). Its checks run instead as a script in an environment of its own, made from a requirements file
beside the tests, under `.venv-clients/NAME` (git-ignored). Making it takes 80-170 s once; it is then reused for as
long as the requirements file and the interpreter are unchanged, and a half-made one (no stamp) is made again.
`NNSERVE_CLIENT_ENVS=DIR` keeps the environments elsewhere, e.g. in a folder that outlives CI's fresh clones, so
that CI too makes them once per machine. A lock file keeps two test sessions from making the same one at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIP_TIMEOUT_S = 600.0
"""A cold pip cache on the 2-core machine took about 4 minutes for nnserve's and kserve's dependencies together."""
_STAMP = ".nnserve-requirements.sha256"


def environments_folder() -> Path:
    configured = os.environ.get("NNSERVE_CLIENT_ENVS")
    return Path(configured) if configured else ROOT / ".venv-clients"


def _fingerprint(requirements: Path) -> str:
    """What the environment was made from: the requirements' text and the interpreter that made it."""
    digest = hashlib.sha256(requirements.read_bytes())
    digest.update(f"\n{sys.version}\n{Path(sys.base_prefix).resolve()}\n".encode())
    return digest.hexdigest()


def client_python(name: str, requirements: Path) -> Path:
    """The interpreter of environment `name` with `requirements` installed, made (or remade) when needed.

    Raises AssertionError with pip's output when the environment cannot be made (e.g. no package index reachable).
    """
    folder = environments_folder()
    folder.mkdir(parents=True, exist_ok=True)
    env = folder / name
    python = env / "bin" / "python"
    wanted = _fingerprint(requirements)
    with (folder / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = env / _STAMP
        if python.exists() and stamp.exists() and stamp.read_text().strip() == wanted:
            return python
        shutil.rmtree(env, ignore_errors=True)
        steps = [
            [sys.executable, "-m", "venv", str(env)],
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", str(requirements)],
        ]
        for step in steps:
            try:
                done = subprocess.run(step, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
            except subprocess.TimeoutExpired as exc:
                raise AssertionError(f"making the {name} client environment took over {PIP_TIMEOUT_S:.0f} s: "
                                     f"{' '.join(step)}") from exc
            if done.returncode != 0:
                raise AssertionError(f"making the {name} client environment failed ({done.returncode}): "
                                     f"{' '.join(step)}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
        stamp.write_text(wanted + "\n")  # last: an environment without it is remade
    return python
