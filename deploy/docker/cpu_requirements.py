"""Print the installed nnserve distribution's requirements for the CPU image, for `pip install -r`.

On Linux x86_64 the wheel asks for onnxruntime-gpu: about 250 MB of CUDA kernels that a CPU image
never runs. The CPU image takes the plain `onnxruntime` requirement (with its version range) on
every platform instead; every other line is the wheel's own metadata, so the image cannot drift
from pyproject.toml. Of the extras, the image's (`IMAGE_EXTRAS`: tracing) are kept. The CUDA image
installs the wheel as it is, with the same extras.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import requires

IMAGE_EXTRAS = ("tracing",)
"""Extras both images carry: OpenTelemetry tracing is off until OTEL_* variables turn it on."""


def _name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"cannot read a project name from requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def cpu_requirements(declared: list[str]) -> list[str]:
    """`declared` (Requires-Dist lines) without extras but the image's, and with onnxruntime-gpu replaced by
    onnxruntime."""
    lines: list[str] = []
    for requirement in declared:
        specifier, _, marker = requirement.partition(";")
        if "extra ==" in marker:
            extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
            if extra is not None and extra[1] in IMAGE_EXTRAS:
                lines.append(specifier.strip())
            continue
        name = _name(specifier)
        if name == "onnxruntime-gpu":
            continue
        lines.append(specifier.strip() if name == "onnxruntime" else requirement.strip())
    if not any(_name(line) == "onnxruntime" for line in lines):
        raise ValueError("the distribution declares no plain 'onnxruntime' requirement to use for the CPU image")
    return lines


def main() -> int:
    sys.stdout.write("".join(line + "\n" for line in cpu_requirements(requires("nnserve") or [])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
