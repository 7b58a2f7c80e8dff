"""Atomic writes of models into a model repository: <repo>/<model>/<version>/model.onnx."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx

MODEL_FILENAME = "model.onnx"
EXTERNAL_DATA_FILENAME = "model.onnx.data"
CONFIG_FILENAME = "config.json"
# protobuf cannot serialise a message past 2 GiB; larger models keep weights beside the graph.
EXTERNAL_DATA_THRESHOLD_BYTES = 2**31 - 2**24

DEFAULT_CONFIG = {"max_batch_size": 64}  # batching and the rest follow the server's defaults and flags


class RepositoryError(RuntimeError):
    """The model could not be written where it was asked to go."""


def existing_versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def write_model(
    model: onnx.ModelProto,
    repository: Path,
    name: str,
    *,
    version: int | None = None,
    check: Callable[[Path], None] | None = None,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD_BYTES,
) -> tuple[Path, int]:
    """Write the model into a temporary folder, run `check` on it, then rename it into place.

    The rename makes the version appear whole or not at all, so a server scanning the
    repository never sees a half-written model. Returns (model path, version).
    """
    model_dir = repository / name
    model_dir.mkdir(parents=True, exist_ok=True)
    if version is not None and version < 1:
        raise RepositoryError(f"version must be a positive integer, found {version}")
    if version is not None and (model_dir / str(version)).exists():
        raise RepositoryError(f"{model_dir / str(version)} already exists; omit --version to take the next free one")

    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    staging.chmod(0o755)  # mkdtemp makes 0700; a server running as another user must read it
    try:
        staged = staging / MODEL_FILENAME
        _save(model, staged, external_data_threshold)
        if check is not None:
            check(staged)
        final_version = _rename_into_place(staging, model_dir, version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _write_default_config(model_dir)
    return model_dir / str(final_version) / MODEL_FILENAME, final_version


def _save(model: onnx.ModelProto, path: Path, external_data_threshold: int) -> None:
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    if weight_bytes >= external_data_threshold:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=EXTERNAL_DATA_FILENAME,
            size_threshold=min(1024, external_data_threshold),
        )
    else:
        path.write_bytes(model.SerializeToString())


def _rename_into_place(staging: Path, model_dir: Path, version: int | None) -> int:
    if version is not None:
        target = model_dir / str(version)
        if target.exists():
            raise RepositoryError(f"{target} already exists")
        os.rename(staging, target)
        return version
    for _ in range(100):  # another build may take the same number concurrently
        candidate = max(existing_versions(model_dir), default=0) + 1
        try:
            os.rename(staging, model_dir / str(candidate))  # fails if the target holds files
        except OSError:
            continue
        return candidate
    raise RepositoryError(f"could not find a free version number in {model_dir}")


def _write_default_config(model_dir: Path) -> None:
    config = model_dir / CONFIG_FILENAME
    if config.exists():
        return
    fd, tmp = tempfile.mkstemp(prefix=".config-", dir=model_dir)
    with os.fdopen(fd, "w") as handle:
        json.dump(DEFAULT_CONFIG, handle, indent=2)
        handle.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, config)
