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

FP16_SUFFIX = "_fp16"


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
    either when the version the build would compare with (`version`, else the latest) was built
    from the same network (same spec hash and dtype), so re-running a build script does not pile
    up identical versions. `target_name` says which model it writes to (an fp16 build gets its own).
    """
    network = resolve_spec(spec)
    if fp16:
        network = network.with_dtype("float16")
    model_name = target_name(network, name=name, version=version, fp16=fp16)
    if skip_unchanged:
        same = _same_network_at(Path(repository) / model_name, version, network)
        if same is not None:
            return BuildResult(same[0], same[1], network, network.dtype, None, skipped=True)
    model = export_onnx(network)
    reports: list[VerificationReport] = []

    def check(path: Path) -> None:
        onnx.checker.check_model(str(path), full_check=True)  # the path form also handles external data
        if verify:
            reports.append(verify_model(path, network, network.dtype))

    model_path, final_version = write_model(
        model,
        Path(repository),
        model_name,
        version=version,
        check=check,
        external_data_threshold=external_data_threshold,
    )
    return BuildResult(model_path, final_version, network, network.dtype, reports[0] if reports else None)


def target_name(network: NetworkSpec, *, name: str | None, version: int | None, fp16: bool) -> str:
    """The model a build writes to: `name` when given; else `<spec name>_fp16` for an fp16 build without an
    explicit version; else the spec's name.

    An fp16 model takes FP16 tensors, so as the next version of the float32 model it would replace it for every
    client under the default version policy. An explicit `version` keeps the spec's name: asking for version N of
    the spec's model is how to put the fp16 model beside (or after) the float32 versions on purpose.
    """
    if name:
        if not is_plain_name(name):
            raise SpecError(network.source, "--name", f"expected letters, digits, '_', '-' or '.', found {name!r}")
        return name
    if fp16 and version is None:
        fp16_name = network.name + FP16_SUFFIX
        if not is_plain_name(fp16_name):
            raise SpecError(
                network.source, "--fp16", f"the fp16 model's name {fp16_name!r} is too long; give one with --name"
            )
        return fp16_name
    return network.name


def _same_network_at(model_dir: Path, version: int | None, network: NetworkSpec) -> tuple[Path, int] | None:
    """(path, version) of `version` (else the latest one) when it holds this network in this dtype."""
    versions = existing_versions(model_dir)
    if version is None and versions:
        version = versions[-1]
    if version is None or version not in versions:
        return None
    path = model_dir / str(version) / MODEL_FILENAME
    try:
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:  # an unreadable version is simply not "the same"
        return None
    if props.get("nnserve.spec_sha256") == network.spec_sha256 and props.get("nnserve.dtype") == network.dtype:
        return path, version
    return None
