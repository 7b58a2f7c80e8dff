"""Peer servers measured beside nnserve: MLServer and Triton's core (PyTriton), each in its own virtual environment.

Neither is a dependency of nnserve: `setup_*` creates `benchmarks/.cache/venvs/<peer>` with the peer's pinned
packages on first use (time-boxed), and a peer that cannot be installed or started is skipped with the reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENVS = HERE.parent / ".cache" / "venvs"
INSTALL_TIMEOUT_S = 900

MLSERVER_PACKAGES = ("mlserver==1.7.1", "uvloop==0.21.0", "onnxruntime", "numpy")
"""MLServer 1.7.1 does not run with uvloop 0.22+ (design.md); it has no ONNX runtime, so ours is mlserver_runtime."""
PYTRITON_PACKAGES = ("nvidia-pytriton==0.7.0", "onnxruntime", "numpy")
UVLOOP_PACKAGE = "uvloop==0.23.0"
"""For the echo server's uvloop flavour only; installed into a folder of its own, put on that process's path."""
PY_SPY_PACKAGE = "py-spy==0.4.3"
"""The sampling profiler behind `rest.py`'s per-request CPU breakdown; a static binary in its wheel."""

_RLOCK_FIX = textwrap.dedent('''\
    # PyTriton's Python-backend stub embeds a CPython 3.11 older than this interpreter's standard library: its C RLock
    # lacks `_recursion_count`, which multiprocessing.resource_tracker (3.11.5+) calls. Give the tracker a Python one.
    import threading

    if not hasattr(threading.RLock(), "_recursion_count"):
        import multiprocessing.resource_tracker as _tracker

        _tracker._resource_tracker._lock = threading._PyRLock()
''')


def _install_step(arguments: list[str], description: str) -> str:
    """Run one time-boxed install command; "" on success, else why it failed."""
    try:
        subprocess.run(arguments, check=True, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.CalledProcessError as exc:
        tail = " | ".join((exc.stderr or exc.stdout or "").strip().splitlines()[-3:])
        return f"{description} failed: {tail}"
    except subprocess.TimeoutExpired:
        return f"{description} took more than {INSTALL_TIMEOUT_S} s"
    return ""


def _venv(name: str, packages: tuple[str, ...], install: bool) -> tuple[Path | None, str]:
    """The venv's python, creating it when allowed; (None, why) when it is not there and cannot be made."""
    root = VENVS / name
    python = root / "bin" / "python"
    marker = root / ".installed"
    if marker.exists() and marker.read_text() == " ".join(packages):
        return python, ""
    if not install:
        return None, f"not installed (run without --no-install to create {root})"
    shutil.rmtree(root, ignore_errors=True)
    why = _install_step([sys.executable, "-m", "venv", str(root)], f"python -m venv {root}") or _install_step(
        [str(python), "-m", "pip", "install", "--quiet", *packages], f"pip install {' '.join(packages)}")
    if why:
        return None, why
    marker.write_text(" ".join(packages))
    return python, ""


def _target_folder(name: str, package: str, install: bool) -> tuple[Path | None, str]:
    """`.cache/<name>`, holding `package` installed with `pip --target` (created when allowed), or (None, why)."""
    target = HERE.parent / ".cache" / name
    marker = target / ".installed"
    if marker.exists() and marker.read_text() == package:
        return target, ""
    if not install:
        return None, f"not installed (run without --no-install to create {target})"
    shutil.rmtree(target, ignore_errors=True)
    why = _install_step([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target), package],
                        f"pip install {package}")
    if why:
        return None, why
    marker.write_text(package)
    return target, ""


def setup_uvloop(install: bool) -> tuple[Path | None, str]:
    """A folder holding uvloop (for PYTHONPATH), so the benchmark's interpreter can run the uvloop echo flavour."""
    return _target_folder("uvloop", UVLOOP_PACKAGE, install)


def setup_py_spy(install: bool) -> tuple[Path | None, str]:
    """The `py-spy` sampling profiler's binary (from its PyPI wheel), for `rest.py`'s CPU breakdown."""
    target, why = _target_folder("py-spy", PY_SPY_PACKAGE, install)
    if target is None:
        return None, why
    binary = target / "bin" / "py-spy"
    return (binary, "") if binary.exists() else (None, f"no bin/py-spy in {target}")


def setup_mlserver(install: bool) -> tuple[Path | None, str]:
    return _venv("mlserver", MLSERVER_PACKAGES, install)


def setup_pytriton(install: bool) -> tuple[Path | None, str]:
    python, why = _venv("pytriton", PYTRITON_PACKAGES, install)
    if python is None:
        return None, why
    site = next((python.parent.parent / "lib").glob("python3*/site-packages"), None)
    if site is not None and not (site / "_nnserve_bench_rlock_fix.pth").exists():
        (site / "_nnserve_bench_rlock_fix.py").write_text(_RLOCK_FIX)
        (site / "_nnserve_bench_rlock_fix.pth").write_text("import _nnserve_bench_rlock_fix\n")
    return python, ""


def mlserver_command(
    python: Path, workdir: Path, model: str, onnx_path: Path, ports: tuple[int, int, int], *, adaptive_batching: bool,
    more_models: Mapping[str, Path] | None = None,
) -> list[str]:
    """Write MLServer's settings and model folders under `workdir`; the command that starts it.

    `parallel_workers` 0 runs inference in the server process (no inter-process hop: its fastest setting for a model
    this small); adaptive batching (max 64 rows, 500 us) is MLServer's own dynamic batching. `more_models` (name ->
    ONNX file) are served by the same server beside `model`.
    """
    grpc_port, http_port, metrics_port = ports
    shutil.rmtree(workdir, ignore_errors=True)
    for name, path in {model: onnx_path, **(more_models or {})}.items():
        model_dir = workdir / name
        model_dir.mkdir(parents=True)
        shutil.copy(HERE / "mlserver_runtime.py", model_dir / "mlserver_runtime.py")
        settings = {"name": name, "implementation": "mlserver_runtime.OnnxModel", "parameters": {"uri": str(path)}}
        if adaptive_batching:
            settings |= {"max_batch_size": 64, "max_batch_time": 0.0005}
        (model_dir / "model-settings.json").write_text(json.dumps(settings))
    server = {"grpc_port": grpc_port, "http_port": http_port, "metrics_port": metrics_port, "parallel_workers": 0,
              "host": "127.0.0.1"}
    (workdir / "settings.json").write_text(json.dumps(server))
    return [str(python.parent / "mlserver"), "start", str(workdir)]


def pytriton_command(
    python: Path, model: str, onnx_path: Path, ports: tuple[int, int, int], *,
    more_models: Mapping[str, Path] | None = None,
) -> list[str]:
    """The command that starts PyTriton serving `model` (and `more_models`, name -> ONNX file) on these ports."""
    grpc_port, http_port, metrics_port = ports
    extra = [f"{name}={path}" for name, path in (more_models or {}).items()]
    return [str(python), str(HERE / "pytriton_server.py"), str(onnx_path), model, str(grpc_port), str(http_port),
            str(metrics_port), *extra]
