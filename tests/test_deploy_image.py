"""deploy/docker: the CPU image's build and start, replayed from Dockerfile.cpu in a fresh virtual environment.

No container engine can build here (no Docker daemon; buildah runs, but no registry is reachable for the base
image), so `test_cpu_image_builds_and_serves_from_its_own_dockerfile` plays the image instead: it reads
Dockerfile.cpu and performs its COPY, WORKDIR, ENV and RUN instructions under a temporary root (`rootfs`,
with every absolute container path moved beneath it), then starts ENTRYPOINT + CMD with the image's ENV, waits
on the HEALTHCHECK command, infers, and stops the server with STOPSIGNAL. `python` is this machine's base
interpreter, standing for the python:3.11-slim base image. Not replayed: the RUN that creates the system user
(it needs root and changes the host) and USER itself. Because the commands come from the Dockerfile, the
image and this test cannot drift apart. The static tests pin what the CUDA image must match.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from nnserve.protos import grpc_service_pb2 as pb
from nnserve.protos import grpc_service_pb2_grpc as pb_grpc
from nnserve.server.cli import OPTIONS
from nnserve.server.settings import ServerSettings
from tests.conftest import read_port_file
from tests.dockerfile import instructions, substitute

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "deploy" / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}
SYSTEM_USER_COMMANDS = ("groupadd ", "useradd ")


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    every = instructions(dockerfile)
    start = max(i for i, (word, _) in enumerate(every) if word == "FROM")
    return every[start:]


def image_env(dockerfile: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in final_stage(dockerfile):
        if word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = substitute(value, env)
    return env


def exec_form(dockerfile: Path, word: str) -> list[str]:
    """The last ENTRYPOINT/CMD (JSON form), or HEALTHCHECK's command after its options."""
    rest = [text for w, text in final_stage(dockerfile) if w == word][-1]
    if word == "HEALTHCHECK":
        rest = rest[rest.index("CMD ") + 4 :]
    parsed: list[str] = json.loads(rest)
    return parsed


@dataclass
class Replay:
    """Dockerfile instructions carried out under `rootfs`, one stage after another sharing that root."""

    rootfs: Path
    shim: Path
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    skipped: list[str] = field(default_factory=list)
    mapped: set[str] = field(default_factory=set)

    def host(self, path: str) -> Path:
        return self.rootfs / path.lstrip("/")

    def map_text(self, text: str) -> str:
        """Absolute container paths under a directory this image owns, moved beneath rootfs."""
        if not self.mapped:
            return text
        alternatives = "|".join(re.escape(p) for p in sorted(self.mapped, key=len, reverse=True))
        return re.sub(rf"(?<![\w.-])({alternatives})(?=/|$|[^\w.-])", lambda m: str(self.host(m.group(1))), text)

    def own(self, path: str) -> None:
        """Mark `path` (a directory the image creates) to be moved beneath rootfs wherever it appears."""
        path = posixpath.normpath(path)
        if path.startswith("/") and path not in ("/", "/tmp"):
            self.mapped.add(path)

    def process_env(self) -> dict[str, str]:
        env = {key: self.map_text(value) for key, value in self.env.items() if key != "PATH"}
        path = [self.map_text(part) for part in self.env.get("PATH", "").split(":") if part]
        env["PATH"] = ":".join([*path, str(self.shim), os.environ.get("PATH", "/usr/bin:/bin")])
        env["PIP_CACHE_DIR"] = os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))
        return env

    def run(self, dockerfile: Path) -> None:
        for word, rest in instructions(dockerfile):
            getattr(self, f"do_{word.lower()}", self.do_other)(word, rest)

    def do_from(self, _word: str, _rest: str) -> None:
        self.env, self.workdir = {}, "/"

    def do_env(self, _word: str, rest: str) -> None:
        for pair in shlex.split(rest):
            key, _, value = pair.partition("=")
            self.env[key] = substitute(value, self.env)
            if key.startswith("NNSERVE_"):
                self.own(self.env[key])

    def do_workdir(self, _word: str, rest: str) -> None:
        self.workdir = substitute(rest, self.env)
        self.own(self.workdir)
        self.host(self.workdir).mkdir(parents=True, exist_ok=True)

    def do_copy(self, _word: str, rest: str) -> None:
        parts = shlex.split(substitute(rest, self.env))
        stage = next((p.split("=", 1)[1] for p in parts if p.startswith("--from=")), None)
        *sources, target = [p for p in parts if not p.startswith("--")]
        into_directory = target.endswith("/") or target == "." or len(sources) > 1
        destination = posixpath.normpath(posixpath.join(self.workdir, target))
        self.own(destination)
        if stage is not None:  # the stages share one root here: the path is already where it is copied to
            assert sources == [target], f"COPY --from={stage} must keep the path: {rest}"
            assert self.host(target).exists(), f"COPY --from={stage}: {target} was not built"
            return
        for source in sources:
            origin = REPO / source
            into = self.host(destination)
            if origin.is_dir():
                shutil.copytree(origin, into, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
            else:
                if into_directory:
                    into = into / origin.name
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, into)

    def do_run(self, _word: str, rest: str) -> None:
        if rest.startswith(SYSTEM_USER_COMMANDS):
            self.skipped.append(rest)
            return
        assert not re.search(r"(?<![\w$}/.-])/(opt|models|src|wheels)\b", rest), f"absolute path in RUN: {rest}"
        done = subprocess.run(["sh", "-c", rest], cwd=self.host(self.workdir), env=self.process_env(),
                              capture_output=True, text=True, timeout=240, check=False)
        assert done.returncode == 0, f"RUN {rest}\nfailed with {done.returncode}:\n{done.stdout[-3000:]}\n" \
                                     f"{done.stderr[-3000:]}"

    def do_other(self, word: str, _rest: str) -> None:
        known = {"ARG", "USER", "EXPOSE", "HEALTHCHECK", "STOPSIGNAL", "ENTRYPOINT", "CMD"}
        assert word in known, f"the replay does not know {word}"


def wait_healthy(command: list[str], env: dict[str, str], within_s: float, process: subprocess.Popen[bytes]) -> str:
    """Run the HEALTHCHECK command until it succeeds (Docker's cadence is 10 s; this polls faster)."""
    deadline = time.monotonic() + within_s
    last = ""
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited with {process.returncode}"
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30, check=False)
        last = done.stdout + done.stderr
        if done.returncode == 0:
            return last
        time.sleep(0.3)
    pytest.fail(f"HEALTHCHECK never passed within {within_s} s; last output: {last}")


@pytest.mark.timeout(290)
def test_cpu_image_builds_and_serves_from_its_own_dockerfile(tmp_path: Path) -> None:
    shim = tmp_path / "base-image-bin"  # `python` of the base image
    shim.mkdir()
    (shim / "python").symlink_to(getattr(sys, "_base_executable", sys.executable))
    replay = Replay(rootfs=tmp_path / "rootfs", shim=shim)
    replay.run(DOCKERFILES["cpu"])
    assert len(replay.skipped) == 1, replay.skipped

    home = replay.host(replay.env["NNSERVE_HOME"])
    python = home / "bin" / "python"
    versions = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m, json; "
         "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))"],
        capture_output=True, text=True, check=True, timeout=60,
    )
    installed = json.loads(versions.stdout)
    assert "onnxruntime" in installed, "the CPU image serves with plain onnxruntime"
    assert "onnxruntime-gpu" not in installed, "the CPU image must not carry onnxruntime-gpu"
    assert "nnserve" in installed
    repository = replay.host(replay.env["NNSERVE_MODEL_REPOSITORY"])
    examples = sorted(json.loads(p.read_text())["name"] for p in (REPO / "examples").glob("*.json"))
    assert sorted(p.name for p in repository.iterdir() if not p.name.startswith(".")) == examples

    # `docker run -p`: the ports move instead (this host's network is shared) to free ones the server reports, and
    # stay on loopback. The HEALTHCHECK command finds the server from the same variables, as in the container.
    env = replay.process_env()
    port_file = tmp_path / "ports.json"
    env.update(NNSERVE_GRPC_PORT="0", NNSERVE_HTTP_PORT="0", NNSERVE_METRICS_PORT="0", NNSERVE_HOST="127.0.0.1",
               NNSERVE_PORT_FILE=str(port_file))
    argv = exec_form(DOCKERFILES["cpu"], "ENTRYPOINT") + exec_form(DOCKERFILES["cpu"], "CMD")
    executable = shutil.which(argv[0], path=env["PATH"])
    assert executable is not None
    assert Path(executable).is_relative_to(home), "ENTRYPOINT must run the image's nnserve"
    probe = shutil.which(exec_form(DOCKERFILES["cpu"], "HEALTHCHECK")[0], path=env["PATH"])
    assert probe is not None
    assert Path(probe).is_relative_to(home), "HEALTHCHECK must run the package's nnserve-healthcheck"
    log = tmp_path / "nnserve.log"
    with log.open("wb") as sink:
        process = subprocess.Popen([executable, *argv[1:]], env=env, cwd=replay.host(replay.workdir),
                                   stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ports = read_port_file(port_file, process, log, timeout=90)
        health = wait_healthy(exec_form(DOCKERFILES["cpu"], "HEALTHCHECK"), env, 90, process)
        assert f"localhost:{ports['grpc']} service '': SERVING" in health
        with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
            request = pb.ModelInferRequest(model_name="two_layer_softmax")
            request.inputs.add(name="input", datatype="FP32", shape=[1, 2])
            request.raw_input_contents.append(np.array([[1.5, -0.5]], dtype=np.float32).tobytes())
            reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        output = np.frombuffer(reply.raw_output_contents[0], dtype=np.float32)
        np.testing.assert_allclose(output, [0.5374, 0.4626], atol=1e-3)  # document 001: 0.538, 0.463
        stop_signal = [text for word, text in final_stage(DOCKERFILES["cpu"]) if word == "STOPSIGNAL"][-1]
        process.send_signal(getattr(signal, stop_signal))
        assert process.wait(timeout=30) == 0, log.read_text(errors="replace")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@pytest.mark.parametrize("flavour", list(DOCKERFILES))
def test_image_runs_nnserve_serve_unprivileged_on_the_documented_ports(flavour: str) -> None:
    dockerfile = DOCKERFILES[flavour]
    stage = final_stage(dockerfile)
    assert exec_form(dockerfile, "ENTRYPOINT") == ["nnserve", "serve"]
    assert exec_form(dockerfile, "HEALTHCHECK") == ["nnserve-healthcheck"]
    users = [text for word, text in stage if word == "USER"]
    assert users
    assert int(users[-1].split(":")[0]) >= 1000
    exposed = {int(p.split("/")[0]) for word, text in stage if word == "EXPOSE" for p in text.split()}
    env = image_env(dockerfile)
    declared = {int(env[f"NNSERVE_{kind}_PORT"]) for kind in ("GRPC", "HTTP", "METRICS")}
    assert exposed == declared == {ServerSettings.grpc_port, ServerSettings.http_port, ServerSettings.metrics_port}
    settings = {option.env for option in OPTIONS}
    for name in env:
        if name.startswith("NNSERVE_") and name != "NNSERVE_HOME":
            assert name in settings, f"{flavour}: {name} is not a `nnserve serve` setting"
    assert env["NNSERVE_DEVICE"] == {"cpu": "cpu", "cuda": "auto"}[flavour]
    assert [text for word, text in stage if word == "STOPSIGNAL"] == ["SIGTERM"]
    assert not any("healthcheck" in text for word, text in stage if word == "COPY"), \
        "nnserve-healthcheck comes with the package (a console script), not as a copied file"


def test_cuda_base_image_matches_onnxruntime_gpu_cuda_and_cudnn_majors() -> None:
    try:
        requires = importlib.metadata.requires("onnxruntime-gpu") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("onnxruntime-gpu is not installed here (it exists for Linux x86_64 only)")
    arg = next(text for word, text in instructions(DOCKERFILES["cuda"]) if word == "ARG" and "CUDA_IMAGE=" in text)
    match = re.fullmatch(r"CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn-runtime-ubuntu(\d+\.\d+)", arg)
    assert match, arg
    cuda_runtime = next(r for r in requires if r.startswith("nvidia-cuda-runtime"))
    cudnn = next(r for r in requires if r.startswith("nvidia-cudnn-cu"))
    # onnxruntime-gpu's own CUDA extras name the majors it was built with, e.g. nvidia-cuda-runtime~=13.0.
    assert re.search(r"~=\s*(\d+)", cuda_runtime)[1] == match[1], (cuda_runtime, arg)  # type: ignore[index]
    # NVIDIA's `-cudnn-` tags for CUDA 12.x and later carry cuDNN 9.
    assert re.search(r"~=\s*(\d+)", cudnn)[1] == "9", cudnn  # type: ignore[index]
    assert cudnn.startswith(f"nvidia-cudnn-cu{match[1]}")


def dockerignore_includes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    included = True
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.removeprefix("!").strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            included = negated
    return included


def test_dockerignore_sends_only_what_the_dockerfiles_copy() -> None:
    patterns = [
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True, timeout=30).stdout.split()
    files = [f for f in listed if (REPO / f).is_file()]
    sources: set[str] = set()
    for dockerfile in DOCKERFILES.values():
        for word, rest in instructions(dockerfile):
            if word == "COPY" and "--from=" not in rest:
                sources.update(p.rstrip("/") for p in shlex.split(rest)[:-1])
    for source in sorted(sources):
        under = [f for f in files if f == source or f.startswith(source + "/")]
        assert under, f"COPY source {source} does not exist"
        assert all(dockerignore_includes(f, patterns) for f in under), f"{source} is excluded by .dockerignore"
    for left_out in ("tests/test_lint.py", ".ci/run", "deploy/k8s/base/deployment.yaml", ".venv/bin/python",
                     "server/__pycache__/app.cpython-311.pyc", "model_repository/x/1/model.onnx"):
        assert not dockerignore_includes(left_out, patterns), left_out
