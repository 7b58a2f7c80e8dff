"""The GPU subset (`pytest -m gpu`): what only a machine with a usable CUDA device shows (issue 20).

Every test is skipped, with the reason, where `cuda_unavailable_reason(0)` says CUDA cannot be used (CI and the
development machines); `benchmarks/device_check.py` runs the subset first on the GPU machine. The checks:

* the provider really in use is CUDA (`session.get_providers()`), with TF32 off and the requested device;
* every example network and the 25M network, in float32 and float16, match the builder's numpy forward pass within
  the builder's own tolerances (1e-4 and 2e-2 of max(1, max |expected|)); 1e-4 is also well below what TF32's
  10-bit mantissa would give on the 4096-wide layers (about 1e-3, `server/providers.py`), so TF32 must be off;
* outputs are bound with I/O binding into buffers allocated per batch: two batches never share memory, and a batch's
  outputs (and the views that responses are) keep their values after later batches ran, also under concurrent
  requests through the server, where responses are views into the batch's outputs;
* `device_id` is honoured, and an invalid one is refused (by the runner, at server start, per model);
* a reload swaps the model on the GPU while requests keep succeeding;
* the GPU's memory (NVML, else nvidia-smi) does not grow over repeated batches.

`NNSERVE_GPU_TESTS_ON_CPU=1` runs what can run without a GPU on the CPU provider, with I/O binding forced on the
runner: the references, tolerances, buffer lifetimes, concurrency and reload paths. The CUDA-only checks (provider
options, device ids, GPU memory) are then skipped; it is a check of the tests themselves, not of CUDA.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from nnserve.builder import NetworkSpec, build, load_spec
from nnserve.builder.random_mlp import parse_widths, random_mlp
from nnserve.builder.reference import forward
from nnserve.protos import grpc_service_pb2 as pb
from nnserve.server.errors import DeviceUnavailableError
from nnserve.server.providers import CPU, CUDA, cuda_unavailable_reason
from nnserve.server.runner import ModelRunner, RunnerOptions
from tests.conftest import (
    EXAMPLES,
    RunningServer,
    infer_request,
    output_arrays,
    running_server,
    scale_model,
    write_model,
)

ON_CPU = os.environ.get("NNSERVE_GPU_TESTS_ON_CPU") == "1"
DEVICE = "cpu" if ON_CPU else "cuda"
PROVIDER = CPU if ON_CPU else CUDA
_REASON = None if ON_CPU else cuda_unavailable_reason(0)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_REASON is not None, reason=f"no usable CUDA device: {_REASON}"),
]
cuda_only = pytest.mark.skipif(ON_CPU, reason="a CUDA-only check (NNSERVE_GPU_TESTS_ON_CPU runs the rest on CPU)")

TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
"""The builder's verification tolerances (`builder/verify.py`), relative to max(1, max |expected|)."""
DTYPES = {"float32": np.float32, "float16": np.float16}
BIG_WIDTHS = "1024x4096x4096x1024"
SPECS = sorted(EXAMPLES.glob("*.json"))
GPU_MEMORY_GROWTH_LIMIT_MIB = 32.0
"""What repeated batches may add to the GPU's used memory once every size has run once: a steady arena adds nothing,
while a leak of any per-batch device buffer (a 256-row batch's input alone is 1 MiB, its activations 8 MiB) would add
at least 60 MiB over the 50 rounds of batch sizes 1, 8, 64 and 256 measured."""
GPU_MEMORY_ROUNDS = 50


@dataclass(frozen=True)
class Built:
    spec: NetworkSpec
    """The network as stored (dtype included), what the numpy reference runs."""
    path: Path


@dataclass(frozen=True)
class GpuRepository:
    root: Path
    models: dict[str, Built]


def _build(spec: NetworkSpec, root: Path, dtype: str, name: str) -> Built:
    result = build(spec, root, name=name, fp16=dtype == "float16")
    return Built(result.spec, result.model_path)


@pytest.fixture(scope="module")
def gpu_repo(tmp_path_factory: pytest.TempPathFactory) -> GpuRepository:
    """Every example in float32 and float16, the 25M network (`big`, `big_fp16`) and a mid-sized MLP (`mid`)."""
    root = tmp_path_factory.mktemp("gpu-repository")
    models: dict[str, Built] = {}
    for path in SPECS:
        spec = load_spec(path)
        models[spec.name] = _build(spec, root, "float32", spec.name)
        models[f"{spec.name}_fp16"] = _build(spec, root, "float16", f"{spec.name}_fp16")
    big = random_mlp(parse_widths(BIG_WIDTHS), name="big", seed=0)
    models["big"] = _build(big, root, "float32", "big")
    models["big_fp16"] = _build(big, root, "float16", "big_fp16")
    models["mid"] = _build(random_mlp([64, 512, 64], name="mid", seed=1), root, "float32", "mid")
    return GpuRepository(root, models)


def load(built: Built, **options: object) -> ModelRunner:
    """The server's runner for a built model on the device under test (I/O binding forced when that is the CPU)."""
    return ModelRunner.load(built.path.parent.parent.name, 1, built.path, RunnerOptions(
        device=DEVICE, io_binding=True if ON_CPU else None, **options))  # type: ignore[arg-type]


def inputs_for(spec: NetworkSpec, rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, spec.input_size)).astype(DTYPES[spec.dtype])


def assert_matches_numpy(actual: np.ndarray, spec: NetworkSpec, x: np.ndarray, what: str) -> None:
    """`actual` is `spec`'s float64 numpy forward pass of `x`, within the builder's tolerance for its dtype."""
    expected = forward(spec, x.astype(np.float64))
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    assert actual.dtype == DTYPES[spec.dtype], f"{what}: dtype {actual.dtype}, expected {spec.dtype}"
    scale = max(1.0, float(np.abs(expected).max()))
    error = float(np.abs(actual.astype(np.float64) - expected).max())
    assert error <= TOLERANCE[spec.dtype] * scale, (
        f"{what}: max error {error:.3g} > {TOLERANCE[spec.dtype]} x {scale:.3g} ({spec.dtype})")


def run(runner: ModelRunner, spec: NetworkSpec, x: np.ndarray) -> np.ndarray:
    return runner.run({spec.input_name: x})[spec.output_name]


# ---------------------------------------------------------------------------------------------------------------
# The provider.


def test_sessions_really_run_on_the_cuda_provider(gpu_repo: GpuRepository) -> None:
    runner = load(gpu_repo.models["big"])
    assert runner._session.get_providers()[0] == PROVIDER
    assert runner.provider == PROVIDER
    assert runner.provider_fallback == ""


@cuda_only
def test_cuda_sessions_run_fp32_without_tf32_on_the_requested_device(gpu_repo: GpuRepository) -> None:
    options = load(gpu_repo.models["big"])._session.get_provider_options()[CUDA]
    assert options["use_tf32"] == "0"
    assert options["device_id"] == "0"


@pytest.fixture(scope="module")
def gpu_server(gpu_repo: GpuRepository) -> Iterator[RunningServer]:
    """The real server over the whole GPU repository on the device under test (every model warmed up)."""
    with running_server(gpu_repo.root, device=DEVICE) as server:
        yield server


def test_the_server_serves_every_model_on_the_cuda_provider(gpu_repo: GpuRepository, gpu_server: RunningServer) -> None:
    stub = gpu_server.stub()
    for name in gpu_repo.models:
        config = stub.ModelConfig(pb.ModelConfigRequest(name=name), timeout=10).config
        assert config.parameters["execution_provider"].string_value == PROVIDER, name
        assert config.parameters["provider_fallback"].string_value == "false", name


# ---------------------------------------------------------------------------------------------------------------
# Outputs against numpy.


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("spec_path", SPECS, ids=[path.stem for path in SPECS])
def test_every_example_matches_numpy_on_the_device(gpu_repo: GpuRepository, spec_path: Path, dtype: str) -> None:
    name = load_spec(spec_path).name + ("_fp16" if dtype == "float16" else "")
    built = gpu_repo.models[name]
    runner = load(built)
    for rows in (1, 13):
        x = inputs_for(built.spec, rows, seed=rows)
        assert_matches_numpy(run(runner, built.spec, x), built.spec, x, f"{name}, {rows} rows")


@pytest.mark.parametrize("name", ["big", "big_fp16"])
def test_the_25m_network_matches_numpy_on_the_device(gpu_repo: GpuRepository, name: str) -> None:
    built = gpu_repo.models[name]
    assert built.spec.parameter_count == 25_175_040
    runner = load(built)
    for rows in (1, 64, 256):
        x = inputs_for(built.spec, rows, seed=rows)
        assert_matches_numpy(run(runner, built.spec, x), built.spec, x, f"{name}, {rows} rows")


# ---------------------------------------------------------------------------------------------------------------
# I/O binding and the lifetime of output buffers.


def test_consecutive_batches_get_their_own_output_buffers(gpu_repo: GpuRepository) -> None:
    built = gpu_repo.models["mid"]
    runner = load(built)
    assert runner._use_io_binding, "outputs on CUDA are bound with I/O binding"
    xa, xb = inputs_for(built.spec, 8, seed=1), inputs_for(built.spec, 8, seed=2)
    a = run(runner, built.spec, xa)
    view = a[2:5]  # what a response holds: a view into its batch's outputs
    b = run(runner, built.spec, xb)
    assert not np.shares_memory(a, b)
    assert_matches_numpy(a, built.spec, xa, "first batch, after the second ran")
    assert_matches_numpy(view, built.spec, xa[2:5], "a view into the first batch")
    assert_matches_numpy(b, built.spec, xb, "second batch")


def test_outputs_kept_across_many_batches_keep_their_values(gpu_repo: GpuRepository) -> None:
    built = gpu_repo.models["mid"]
    runner = load(built)
    kept = []
    for index in range(60):
        x = inputs_for(built.spec, (1, 8, 3)[index % 3], seed=100 + index)
        kept.append((x, run(runner, built.spec, x)))
    for index, (x, y) in enumerate(kept):
        assert_matches_numpy(y, built.spec, x, f"batch {index}, checked after all 60 ran")
    for (_, first), (_, second) in itertools.combinations(kept, 2):
        assert not np.shares_memory(first, second)


def test_concurrent_requests_through_the_server_each_get_their_own_rows(
    gpu_repo: GpuRepository, gpu_server: RunningServer
) -> None:
    """Batching on: responses are views into a batch's outputs while they are encoded, so a buffer reused too early
    would hand one request another's rows."""
    spec = gpu_repo.models["mid"].spec
    failures: list[str] = []

    def client(worker: int) -> None:
        stub = gpu_server.stub()
        for index in range(25):
            x = inputs_for(spec, 1 + (worker + index) % 4, seed=worker * 1000 + index)
            try:
                y = output_arrays(stub.ModelInfer(infer_request("mid", {"input": x}), timeout=30))["output"]
                assert_matches_numpy(y, spec, x, f"client {worker} request {index}")
            except Exception as exc:  # collected, the test fails below
                failures.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(worker,)) for worker in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures[:3]
    stats = gpu_server.stub().ModelStatistics(pb.ModelStatisticsRequest(name="mid"), timeout=10).model_stats[0]
    assert stats.inference_count == sum(1 + (w + i) % 4 for w in range(16) for i in range(25))


# ---------------------------------------------------------------------------------------------------------------
# Devices.


def gpu_count() -> int | None:
    """CUDA devices this process may use: CUDA_VISIBLE_DEVICES's when set, else what NVML (or nvidia-smi) sees;
    None when none of them says."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and not d.strip().startswith("-")])
    try:
        import pynvml
    except ImportError:
        pynvml = None
    if pynvml is not None:
        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    if shutil.which("nvidia-smi") is None:
        return None
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    return sum(1 for line in listed.splitlines() if line.startswith("GPU "))


def gpu_memory_used_mib(device_id: int) -> float | None:
    """Memory in use on the GPU (every process's), from NVML or nvidia-smi; None when neither is there. NVML's and
    CUDA's device orders agree on a one-GPU machine (and with CUDA_DEVICE_ORDER=PCI_BUS_ID)."""
    try:
        import pynvml
    except ImportError:
        pynvml = None
    if pynvml is not None:
        pynvml.nvmlInit()
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(device_id))
            return float(info.used) / 2**20
        finally:
            pynvml.nvmlShutdown()
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", str(device_id)]
    return float(subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout.strip())


@cuda_only
def test_every_device_id_is_honoured(gpu_repo: GpuRepository) -> None:
    built = gpu_repo.models["layer_4x3"]
    for device_id in range(min(gpu_count() or 1, 4)):
        runner = load(built, device_id=device_id)
        assert runner.device_id == device_id
        assert runner._session.get_provider_options()[CUDA]["device_id"] == str(device_id)
        x = inputs_for(built.spec, 3, seed=device_id)
        assert_matches_numpy(run(runner, built.spec, x), built.spec, x, f"device {device_id}")


@cuda_only
def test_an_invalid_device_id_is_refused(gpu_repo: GpuRepository, tmp_path: Path) -> None:
    invalid = gpu_count() or 64
    with pytest.raises(DeviceUnavailableError, match=rf"device {invalid}\b"):
        load(gpu_repo.models["layer_4x3"], device_id=invalid)
    with pytest.raises(DeviceUnavailableError, match=rf"device {invalid}\b"), \
            running_server(gpu_repo.root, device="cuda", device_id=invalid):
        pass
    write_model(tmp_path, "good", scale_model(np.dtype(np.float32), 2.0))
    write_model(tmp_path, "elsewhere", scale_model(np.dtype(np.float32), 2.0),
                config={"device": "cuda", "device_id": invalid})
    with running_server(tmp_path, device="cuda", strict_readiness=False) as server:
        stub = server.stub()
        assert stub.ModelReady(pb.ModelReadyRequest(name="good"), timeout=10).ready
        assert not stub.ModelReady(pb.ModelReadyRequest(name="elsewhere"), timeout=10).ready
        reasons = {m.name: m.reason for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models}
        assert f"device {invalid}" in reasons["elsewhere"]


# ---------------------------------------------------------------------------------------------------------------
# Reload and memory.


def test_a_reload_swaps_the_model_on_the_gpu(tmp_path: Path) -> None:
    write_model(tmp_path, "m", scale_model(np.dtype(np.float32), 2.0))
    x = np.arange(8, dtype=np.float32).reshape(2, 4) + 1
    stop = threading.Event()
    seen: list[float] = []
    failures: list[BaseException] = []
    with running_server(tmp_path, device=DEVICE, model_control="explicit") as server:

        def client() -> None:
            stub = server.stub()
            while not stop.is_set():
                try:
                    y = output_arrays(stub.ModelInfer(infer_request("m", {"x": x}), timeout=30))["y"]
                    seen.append(float(y[0, 0]))
                except BaseException as exc:  # collected, the test fails below
                    failures.append(exc)

        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        stub = server.stub()
        try:
            for version, factor in ((2, 3.0), (3, 5.0)):
                write_model(tmp_path, "m", scale_model(np.dtype(np.float32), factor), version=version)
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="m"), timeout=60)
                y = output_arrays(stub.ModelInfer(infer_request("m", {"x": x}), timeout=30))["y"]
                np.testing.assert_array_equal(y, x * factor)
                metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="m"), timeout=10)
                assert list(metadata.versions) == [str(version)]
                config = stub.ModelConfig(pb.ModelConfigRequest(name="m"), timeout=10).config
                assert config.parameters["execution_provider"].string_value == PROVIDER
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
    assert not failures, failures[:3]
    assert set(seen) <= {2.0, 3.0, 5.0}


@pytest.fixture
def gpu_memory() -> None:
    if gpu_memory_used_mib(0) is None:
        pytest.skip("neither pynvml (nvidia-ml-py) nor nvidia-smi is available to read the GPU's memory")


@cuda_only
@pytest.mark.usefixtures("gpu_memory")
def test_gpu_memory_does_not_grow_over_repeated_batches(gpu_repo: GpuRepository) -> None:
    built = gpu_repo.models["big"]
    runner = load(built)
    sizes = (1, 8, 64, 256)
    feeds = {rows: inputs_for(built.spec, rows, seed=rows) for rows in sizes}
    for _ in range(3):  # every size once and again: the arena takes what the largest needs
        for rows in sizes:
            run(runner, built.spec, feeds[rows])
    before = gpu_memory_used_mib(0)
    for _ in range(GPU_MEMORY_ROUNDS):
        for rows in sizes:
            run(runner, built.spec, feeds[rows])
    after = gpu_memory_used_mib(0)
    assert before is not None
    assert after is not None
    assert after - before <= GPU_MEMORY_GROWTH_LIMIT_MIB, f"GPU memory grew from {before:.0f} to {after:.0f} MiB"
