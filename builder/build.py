"""The build pipeline: spec -> ONNX -> checked, verified, atomically written model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from nnserve.builder.export import export_onnx
from nnserve.builder.repository import EXTERNAL_DATA_THRESHOLD_BYTES, MODEL_FILENAME, existing_versions, write_model
from nnserve.builder.spec import NetworkSpec, SpecError, is_plain_name, load_spec, parse_spec
from nnserve.builder.verify import VerificationReport, verify_model


@dataclass(frozen=True)
class BuildResult:
    model_path: Path
    version: int
    spec: NetworkSpec
    dtype: str
    verification: VerificationReport | None
    skipped: bool = False

    @property
    def name(self) -> str:
        return self.model_path.parent.parent.name

    @property
    def parameter_count(self) -> int:
        return self.spec.parameter_count


def resolve_spec(spec: NetworkSpec | str | Path | Mapping[str, Any]) -> NetworkSpec:
    if isinstance(spec, NetworkSpec):
        return spec
    if isinstance(spec, Mapping):
        return parse_spec(spec)
    return load_spec(spec)


def build(
    spec: NetworkSpec | str | Path | Mapping[str, Any],
    repository: str | Path,
    *,
    name: str | None = None,
    version: int | None = None,
    fp16: bool = False,
    verify: bool = True,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD_BYTES,
    skip_unchanged: bool = False,
) -> BuildResult:
    """Validate, export, check and verify a network, then write it into `repository`.

    Nothing is written unless every step passes. With `skip_unchanged`, nothing is written
    either when the latest version was built from the same network (same spec hash and dtype),
    so re-running a build script does not pile up identical versions.
    """
    network = resolve_spec(spec)
    model_name = name or network.name
    if not is_plain_name(model_name):
        raise SpecError(network.source, "--name", f"expected letters, digits, '_', '-' or '.', found {model_name!r}")
    dtype = "float16" if fp16 else network.dtype
    if skip_unchanged and version is None:
        latest = _latest_if_same(Path(repository) / model_name, network, dtype)
        if latest is not None:
            return BuildResult(latest[0], latest[1], network, dtype, None, skipped=True)
    model = export_onnx(network, dtype=dtype)
    reports: list[VerificationReport] = []

    def check(path: Path) -> None:
        onnx.checker.check_model(str(path), full_check=True)  # the path form also handles external data
        if verify:
            reports.append(verify_model(path, network, dtype))

    model_path, final_version = write_model(
        model,
        Path(repository),
        model_name,
        version=version,
        check=check,
        external_data_threshold=external_data_threshold,
    )
    return BuildResult(model_path, final_version, network, dtype, reports[0] if reports else None)


def _latest_if_same(model_dir: Path, network: NetworkSpec, dtype: str) -> tuple[Path, int] | None:
    versions = existing_versions(model_dir)
    if not versions:
        return None
    path = model_dir / str(versions[-1]) / MODEL_FILENAME
    try:
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:  # an unreadable latest version is simply not "the same"
        return None
    if props.get("nnserve.spec_sha256") == network.spec_sha256 and props.get("nnserve.dtype") == dtype:
        return path, versions[-1]
    return None
