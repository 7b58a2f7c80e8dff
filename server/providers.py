"""Execution providers: create onnxruntime sessions on CUDA or CPU and say which one is really used.

onnxruntime-gpu lists `CUDAExecutionProvider` in `get_available_providers()` even when the
CUDA libraries are missing; asking for it then prints a stack of native errors and silently
runs on CPU. So CUDA is probed once per device with onnxruntime's logging silenced, the
session's own `get_providers()` is the only source of truth, and a failure becomes one
clear log line (for `auto`) or a `DeviceUnavailableError` (for `cuda`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnxruntime as ort

from nnserve.server.errors import DeviceUnavailableError

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# onnxruntime's logger severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
_ORT_DEFAULT_SEVERITY = 2
_ORT_SILENT = 4

_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

_quiet_lock = threading.Lock()
_warned_auto_fallback: set[int] = set()
_announced_no_gpu: list[bool] = []

GPU_DEVICE_NODES = ("dev/nvidiactl", "dev/nvidia0", "dev/dxg", "proc/driver/nvidia/version")
"""What shows a GPU to this process: NVIDIA's device nodes and driver (Linux, containers given a GPU), or WSL's
/dev/dxg, through which WSL exposes a Windows host's GPU instead of NVIDIA's nodes."""


def gpu_visible(root: Path = Path("/")) -> bool:
    """Whether any GPU is visible at all (device nodes or a driver under `root`): on a laptop or CI machine without
    one, `--device auto` choosing the CPU is the plan, not a fallback worth a warning."""
    if any((root / node).exists() for node in GPU_DEVICE_NODES):
        return True
    try:
        return any(child.name[6:].isdigit() for child in (root / "dev").glob("nvidia[0-9]*"))
    except OSError:
        return False


@contextmanager
def quiet_onnxruntime() -> Iterator[None]:
    """Silence onnxruntime's process-wide native logger while probing providers."""
    with _quiet_lock:
        ort.set_default_logger_severity(_ORT_SILENT)
        try:
            yield
        finally:
            ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)


def session_options(
    *, intra_op_threads: int = 0, inter_op_threads: int = 0, optimization_level: str = "all"
) -> ort.SessionOptions:
    """SessionOptions with the server's thread and optimisation settings (0 threads: onnxruntime's choice)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.graph_optimization_level = _OPTIMIZATION_LEVELS[optimization_level]
    options.log_severity_level = 3
    return options


def cuda_options(device_id: int) -> dict[str, str]:
    """CUDA provider options: the device, and TF32 off, so that float32 models compute in float32 (TF32's 10-bit
    mantissa would move a 4096-wide layer's outputs by about 1e-3 relative, far past fp32's tolerance)."""
    return {"device_id": str(device_id), "use_tf32": "0"}


@functools.cache
def _preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the nvidia-* pip wheels before the first CUDA session (once per process).

    onnxruntime-gpu finds them through the wheels' rpath in a normal virtual environment, but not when it was
    installed with `pip --target` or the libraries live in another site directory; `preload_dlls` looks there too.
    Its printed complaints about libraries it did not find are kept off stdout: the probe that follows reports
    what is really missing, once, in the server's log format.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None or not gpu_visible():
        return
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            preload(cuda=True, cudnn=True, msvc=False)
        except Exception:  # a missing or broken library shows in the probe's reason; preloading is only a help
            return


@functools.cache
def cuda_unavailable_reason(device_id: int = 0) -> str | None:
    """None when a CUDA session really runs on `device_id`, else why not (probed once per device)."""
    if CUDA not in ort.get_available_providers():
        return (
            f"this onnxruntime build ({ort.__version__}) has no CUDA execution provider; "
            "install onnxruntime-gpu"
        )
    _preload_cuda_libraries()
    try:
        with quiet_onnxruntime():
            options = session_options()
            options.log_severity_level = _ORT_SILENT
            session = ort.InferenceSession(
                _identity_model(), options, providers=[(CUDA, {"device_id": device_id}), CPU]
            )
            providers = session.get_providers()
    except Exception as exc:  # onnxruntime raises its own pybind classes; all mean "no CUDA here"
        return f"CUDA device {device_id} could not be initialised: {_first_line(exc)}"
    if providers and providers[0] == CUDA:
        return None
    return _diagnose_cuda_libraries() or (
        f"onnxruntime could not start CUDA on device {device_id} (no GPU visible, or the driver is too old)"
    )


def create_session(
    model: Path | bytes,
    *,
    device: str,
    device_id: int,
    options: ort.SessionOptions,
    model_label: str = "",
) -> tuple[ort.InferenceSession, str]:
    """A session for `model` on the requested device, and the provider it really runs on.

    `cuda` raises DeviceUnavailableError when CUDA cannot be used; `auto` runs on CPU with one info line when no GPU
    is visible at all, and falls back to CPU with one warning line per process and device when a GPU is visible
    but CUDA cannot be used (missing CUDA 13 / cuDNN 9 libraries, driver too old).
    """
    source = str(model) if isinstance(model, Path) else model
    if device == "cpu":
        return ort.InferenceSession(source, options, providers=[CPU]), CPU
    if device == "auto" and not gpu_visible():
        if not _announced_no_gpu:
            _announced_no_gpu.append(True)
            log.info("no GPU visible (no NVIDIA device nodes or driver, no WSL /dev/dxg): models run on %s", CPU)
        return ort.InferenceSession(source, options, providers=[CPU]), CPU
    reason = cuda_unavailable_reason(device_id)
    if reason is not None:
        if device == "cuda":
            raise DeviceUnavailableError(f"device 'cuda' was requested but CUDA cannot be used: {reason}")
        if device_id not in _warned_auto_fallback:
            _warned_auto_fallback.add(device_id)
            log.warning("CUDA is not usable (%s); models run on %s (pass --device cpu to silence this)", reason, CPU)
        return ort.InferenceSession(source, options, providers=[CPU]), CPU
    with quiet_onnxruntime():
        session = ort.InferenceSession(source, options, providers=[(CUDA, cuda_options(device_id)), CPU])
    provider = session.get_providers()[0]
    if provider != CUDA:
        if device == "cuda":
            raise DeviceUnavailableError(f"model {model_label} did not get CUDA device {device_id} from onnxruntime")
        log.warning("model %s: onnxruntime placed the session on %s instead of CUDA", model_label, provider)
    return session, provider


def _diagnose_cuda_libraries() -> str | None:
    """Why onnxruntime's CUDA provider library does not load (e.g. a missing libcublasLt), without native noise."""
    capi = Path(ort.__file__).parent / "capi"
    shared = capi / "libonnxruntime_providers_shared.so"
    cuda_lib = capi / "libonnxruntime_providers_cuda.so"
    if not cuda_lib.exists():
        return None
    try:
        if shared.exists():
            ctypes.CDLL(os.fspath(shared), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(os.fspath(cuda_lib))
    except OSError as exc:
        return f"onnxruntime's CUDA provider library does not load: {exc}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@functools.cache
def _identity_model() -> bytes:
    """A minimal model (Identity on float [1]) for probing a provider, serialized once."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model.SerializeToString()
