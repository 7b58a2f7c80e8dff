"""Where a model repository's models and versions are on disk, in the three shapes a storage location may hold.

- `repository` (Triton's layout, nnserve's own): `<root>/<model>/<version>/model.onnx`, optional
  `<root>/<model>/config.json`; each folder is a model named after it.
- `model folder`: `<root>/<version>/model.onnx` (optional `<root>/config.json`): the root is one model.
- `model file`: a single `<root>/<anything>.onnx` (with `model.onnx.data` or other external data beside it): one
  model, version 1.

The last two are what a KServe `storageUri` holds when it points at one model; they are served under a name given
by the server (`--model-name`, KServe's `{{.Name}}`). `auto` tells them apart by what the root holds: version
folders (all digits) with a model file in them make a model folder, a single `.onnx` file at the top with no model
folders makes a model file, anything else is a repository.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

MODEL_FILENAME = "model.onnx"
_VERSION_RE = re.compile(r"[0-9]{1,18}")


class LayoutKind(StrEnum):
    AUTO = "auto"
    REPOSITORY = "repository"
    MODEL_FOLDER = "model-folder"
    MODEL_FILE = "model-file"


LAYOUT_KINDS: tuple[str, ...] = tuple(kind.value for kind in LayoutKind)


class LayoutError(ValueError):
    """The root does not hold the layout asked for, or a single-model layout has no name; the message says which."""


@dataclass(frozen=True)
class RepositoryLayout:
    """The resolved layout of one root: which model names it holds and where each one's files are."""

    root: Path
    kind: LayoutKind
    single_name: str | None = None
    """The served name of the one model of a model folder or model file."""
    model_file: str = MODEL_FILENAME
    """The file name of a model-file layout's model (a `.onnx` file at the root)."""

    @classmethod
    def resolve(cls, root: Path, kind: str, model_name: str | None) -> RepositoryLayout:
        """The layout of `root` (`auto` detects it); single-model layouts need `model_name`."""
        chosen = LayoutKind(kind)
        if chosen is LayoutKind.AUTO:
            chosen = detect(root)
        model_file = MODEL_FILENAME
        if chosen is LayoutKind.MODEL_FILE:
            files = _onnx_files(root)
            if len(files) != 1:
                raise LayoutError(
                    f"{root} holds {len(files)} .onnx files at its top ({', '.join(files) or 'none'}); "
                    "a model-file layout is one .onnx file"
                )
            model_file = files[0]
        if chosen is not LayoutKind.REPOSITORY and not model_name:
            raise LayoutError(
                f"{root} holds a single model ({chosen.value} layout): give it a name with --model-name "
                "(KServe's runtime passes the InferenceService's name)"
            )
        return cls(root, chosen, model_name if chosen is not LayoutKind.REPOSITORY else None, model_file)

    @property
    def single(self) -> bool:
        return self.kind is not LayoutKind.REPOSITORY

    def describe(self) -> str:
        if not self.single:
            return f"repository {self.root}"
        return f"{self.kind.value} {self.root} served as model '{self.single_name}'"

    def model_names(self, candidates: list[str]) -> list[str]:
        """The model names: the folders (`candidates`, already validated) of a repository, else the one name."""
        return candidates if not self.single else [self.single_name or ""]

    def model_dir(self, name: str) -> Path:
        """The folder holding a model's `config.json` and versions (the root itself for a single model)."""
        return self.root if self.single else self.root / name

    def knows(self, name: str) -> bool:
        return name == self.single_name if self.single else True

    def version_files(self, model_dir: Path) -> dict[int, Path]:
        """Each version's model file (version folders; version 1 for a model file)."""
        if self.kind is LayoutKind.MODEL_FILE:
            return {1: model_dir / self.model_file}
        return {
            int(child.name): child / MODEL_FILENAME
            for child in model_dir.iterdir()
            if child.is_dir() and _VERSION_RE.fullmatch(child.name)
        }

    def shown(self, name: str, version: int) -> str:
        """How a version's file is named in messages: its place relative to the root."""
        if self.kind is LayoutKind.MODEL_FILE:
            return self.model_file
        if self.kind is LayoutKind.MODEL_FOLDER:
            return f"{version}/{MODEL_FILENAME}"
        return f"{name}/{version}/{MODEL_FILENAME}"


def detect(root: Path) -> LayoutKind:
    """Which layout `root` holds (see the module docstring)."""
    try:
        children = list(root.iterdir())
    except OSError:
        return LayoutKind.REPOSITORY  # the repository reports what cannot be read
    versions = [c for c in children if c.is_dir() and _VERSION_RE.fullmatch(c.name)]
    if any((v / MODEL_FILENAME).exists() for v in versions):
        return LayoutKind.MODEL_FOLDER
    folders = [c for c in children if c.is_dir() and not c.name.startswith(".")]
    if len(_onnx_files(root)) == 1 and not folders:
        return LayoutKind.MODEL_FILE
    return LayoutKind.REPOSITORY


def _onnx_files(root: Path) -> list[str]:
    try:
        return sorted(c.name for c in root.iterdir() if c.is_file() and c.suffix == ".onnx")
    except OSError:
        return []
