"""The model repository: which models and versions exist, which are served, and why the others are not.

Layout: `<root>/<model>/<version>/model.onnx` with an optional `<root>/<model>/config.json`.
Every model is loaded at start; one that fails is recorded UNAVAILABLE with its reason and
the others serve. Each model's state is an immutable `ModelEntry` replaced in one assignment,
so a reload swaps atomically: requests already admitted to the old version's executor finish
there while it drains in the background, and new requests go to the new one.
"""

from __future__ import annotations

import asyncio
import logging
import re
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from nnserve.server import warmup
from nnserve.server.batcher import BatchStats
from nnserve.server.batching_settings import BatchingSettings
from nnserve.server.errors import (
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
)
from nnserve.server.executor import Executor, make_executor
from nnserve.server.model_config import CONFIG_FILENAME, ModelConfig, ModelConfigError, load_model_config
from nnserve.server.repository_layout import RepositoryLayout
from nnserve.server.runner import MODEL_FILENAME, ModelRunner, RunnerOptions
from nnserve.server.settings import ServerSettings
from nnserve.server.statistics import StatisticsRecorder
from nnserve.server.tensors import Signature

log = logging.getLogger(__name__)

MAX_MODEL_NAME_LENGTH = 128
_MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_VERSION_RE = re.compile(r"[0-9]{1,18}")


class ModelState(StrEnum):
    """States as Triton's RepositoryIndex spells them."""

    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"


@dataclass(eq=False)
class ServedVersion:
    """A loaded version: its runner, the executor its requests go through, and its statistics."""

    name: str
    version: int
    runner: ModelRunner
    executor: Executor
    stats: StatisticsRecorder
    config: ModelConfig
    batching: BatchingSettings

    @property
    def signature(self) -> Signature:
        return self.runner.signature

    @property
    def version_text(self) -> str:
        return str(self.version)


@dataclass(frozen=True, eq=False)
class VersionStatus:
    version: int
    state: ModelState
    reason: str = ""
    served: ServedVersion | None = None


@dataclass(frozen=True, eq=False)
class ModelEntry:
    """One model's state, replaced as a whole on load, reload and unload."""

    name: str
    versions: Mapping[int, VersionStatus] = field(default_factory=dict)
    config: ModelConfig | None = None
    reason: str = ""
    """Why the model as a whole is not served (bad config, no versions, unloaded), when it is not."""
    loading: bool = False
    unloaded: bool = False
    """Unloaded by a RepositoryModelUnload request: no longer meant to be served, so it does not count against the
    server's readiness (a model that failed to load does)."""
    default: ServedVersion | None = field(init=False)
    """The newest ready version: what an empty version string selects."""

    def __post_init__(self) -> None:
        ready = [s.served for v, s in sorted(self.versions.items(), reverse=True) if s.served is not None]
        object.__setattr__(self, "default", ready[0] if ready else None)

    @property
    def state(self) -> ModelState:
        if self.default is not None:
            return ModelState.READY
        return ModelState.LOADING if self.loading else ModelState.UNAVAILABLE

    @property
    def ready_versions(self) -> list[int]:
        """Ready versions, newest first."""
        return [v for v, s in sorted(self.versions.items(), reverse=True) if s.served is not None]

    @property
    def served_versions(self) -> list[ServedVersion]:
        return [s.served for s in self.versions.values() if s.served is not None]

    def why_not_ready(self) -> str:
        if self.loading:
            return "the model is still loading"
        reasons = [f"version {v}: {s.reason}" for v, s in sorted(self.versions.items()) if s.reason]
        return self.reason or "; ".join(reasons) or "no version is loaded"


@dataclass(frozen=True)
class IndexRow:
    name: str
    version: str
    state: str
    reason: str


ChangeListener = Callable[[ModelEntry], Awaitable[None]]


def validate_model_name(name: str) -> str:
    """The name itself, if it is a plain model name; InvalidInputError otherwise (no paths, no traversal)."""
    if not name:
        raise InvalidInputError("the model name is empty")
    if len(name) > MAX_MODEL_NAME_LENGTH:
        raise InvalidInputError(f"the model name is {len(name)} characters long; at most {MAX_MODEL_NAME_LENGTH}")
    if not _MODEL_NAME_RE.fullmatch(name) or name in (".", ".."):
        raise InvalidInputError(
            f"{name!r} is not a valid model name: use letters, digits, '_', '-' and '.', starting with a "
            "letter or digit (no '/', no '..')"
        )
    return name


class ModelRepository:
    """Scans, loads, serves and unloads the models of one repository directory."""

    def __init__(self, settings: ServerSettings) -> None:
        """LayoutError (a ValueError) when the root does not hold the layout asked for, or a single model needs a
        name (`--model-name`)."""
        self._settings = settings
        self.root = settings.model_repository
        self._root_resolved = self.root.resolve()
        self.layout = RepositoryLayout.resolve(self.root, settings.repository_layout, settings.model_name)
        if self.layout.single_name is not None:
            validate_model_name(self.layout.single_name)
        self._models: dict[str, ModelEntry] = {}
        self._recorders: dict[tuple[str, int], StatisticsRecorder] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._listeners: list[ChangeListener] = []
        self.startup_complete = False

    # -- queries (the request path) ---------------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> ServedVersion:
        """The served version for a request; ModelNotFoundError / ModelNotReadyError otherwise."""
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFoundError(self._unknown_model_message(name))
        if not version:
            if entry.default is None:
                raise ModelNotReadyError(f"model '{name}' is not ready: {entry.why_not_ready()}")
            return entry.default
        number = _parse_version(version)
        status = entry.versions.get(number) if number is not None else None
        if status is None:
            known = sorted(entry.versions)
            raise ModelNotFoundError(f"model '{name}' has no version {version!r}; versions: {known}")
        if status.served is None:
            raise ModelNotReadyError(f"model '{name}' version {number} is not ready: {status.reason or 'not loaded'}")
        return status.served

    def entry(self, name: str) -> ModelEntry:
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFoundError(self._unknown_model_message(name))
        return entry

    def entries(self) -> list[ModelEntry]:
        return [self._models[name] for name in sorted(self._models)]

    def all_ready(self) -> bool:
        """Whether every model the server is meant to serve is ready: those loaded at start or by a load request and
        not unloaded since. A model that failed to load counts against it; an explicitly unloaded one does not."""
        return self.startup_complete and all(
            e.state is ModelState.READY for e in self._models.values() if not e.unloaded
        )

    def not_ready(self) -> list[ModelEntry]:
        """The models that keep `all_ready` false (for logs and messages)."""
        return [e for e in self.entries() if not e.unloaded and e.state is not ModelState.READY]

    def recorders(self) -> list[StatisticsRecorder]:
        """Statistics of every version loaded since start (cumulative across reloads)."""
        return [self._recorders[key] for key in sorted(self._recorders)]

    def index(self, *, ready_only: bool = False) -> list[IndexRow]:
        """One row per known version, plus models on disk that are not loaded."""
        rows: list[IndexRow] = []
        names = set(self._models) | set(self._scan_names(warn=False))
        for name in sorted(names):
            entry = self._models.get(name)
            if entry is None:
                rows.append(IndexRow(name, "", ModelState.UNAVAILABLE, "not loaded"))
                continue
            if entry.loading and not entry.versions:
                rows.append(IndexRow(name, "", ModelState.LOADING, ""))
            elif not entry.versions:
                rows.append(IndexRow(name, "", ModelState.UNAVAILABLE, entry.why_not_ready()))
            for version, status in sorted(entry.versions.items()):
                rows.append(IndexRow(name, str(version), status.state, status.reason))
        if ready_only:
            rows = [row for row in rows if row.state == ModelState.READY]
        return rows

    def add_listener(self, listener: ChangeListener) -> None:
        """Called with the new entry after every change (health per model uses it)."""
        self._listeners.append(listener)

    # -- lifecycle ----------------------------------------------------------------------------------------------

    async def load_all(self) -> None:
        """Load every model directory in the repository; failures are recorded, never raised."""
        names = self._scan_names()
        if not names:
            log.warning("model repository %s contains no model directories", self.root)
        for name in names:
            self._models[name] = ModelEntry(name, loading=True)
        for name in names:
            try:
                await self.load(name)
            except ModelLoadError:
                pass  # recorded in the entry and logged
            except ModelNotFoundError:
                self._models.pop(name, None)  # removed from disk while starting
            except Exception as exc:  # an error nobody foresaw fails this model only; the others still load
                log.exception("model '%s' failed to load unexpectedly", name)
                self._models[name] = ModelEntry(name, reason=f"unexpected error while loading: {exc}")
        self.startup_complete = True

    async def load(self, name: str) -> ModelEntry:
        """(Re)load a model from disk and swap it in; ModelLoadError with every reason if any version fails.

        If nothing of the new load is servable, a model that was serving keeps serving its old versions.
        """
        validate_model_name(name)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            model_dir = self._model_dir(name)
            old = self._models.get(name)
            entry = await self._build_entry(name, model_dir)
            if entry.default is None and old is not None and old.default is not None:
                log.error("model '%s' reload failed, keeping the versions already loaded: %s", name,
                          entry.why_not_ready())
                raise ModelLoadError(f"model '{name}' could not be reloaded: {entry.why_not_ready()}")
            await self._swap(name, entry)
            failures = [f"version {v}: {s.reason}" for v, s in sorted(entry.versions.items()) if s.served is None]
            if entry.default is None:
                raise ModelLoadError(f"model '{name}' could not be loaded: {entry.why_not_ready()}")
            if failures:
                raise ModelLoadError(f"model '{name}' loaded only in part: {'; '.join(failures)}")
            return entry

    async def unload(self, name: str) -> None:
        """Stop serving a model; requests already accepted finish first (in the background)."""
        validate_model_name(name)
        if name not in self._models and name not in self._scan_names(warn=False):
            raise ModelNotFoundError(self._unknown_model_message(name))
        async with self._locks.setdefault(name, asyncio.Lock()):
            old = self._models.get(name)
            versions = {
                v: VersionStatus(v, ModelState.UNAVAILABLE, "unloaded") for v in (old.versions if old else {})
            }
            await self._swap(
                name, ModelEntry(name, versions, old.config if old else None, reason="unloaded", unloaded=True)
            )
            log.info("model '%s' unloaded", name)

    async def close(self, timeout: float | None = None) -> None:
        """Drain and stop every executor (shutdown)."""
        for entry in self._models.values():
            for served in entry.served_versions:
                self._retire(served, timeout)
        if self._retiring:
            await asyncio.wait(set(self._retiring), timeout=timeout)

    # -- internals -------------------------------------------------------------------------------------------

    def _scan_names(self, *, warn: bool = True) -> list[str]:
        if self.layout.single:
            return self.layout.model_names([])
        try:
            children = sorted(p for p in self.root.iterdir() if p.is_dir())
        except OSError as exc:
            log.error("cannot read model repository %s: %s", self.root, exc)
            return []
        names = []
        for child in children:
            try:
                validate_model_name(child.name)
            except InvalidInputError as exc:
                if warn and not child.name.startswith("."):
                    log.warning("skipping %s: %s", child, exc)
                continue
            names.append(child.name)
        return names

    def _model_dir(self, name: str) -> Path:
        path = self.layout.model_dir(name)
        if not self.layout.knows(name) or not path.is_dir():
            raise ModelNotFoundError(self._unknown_model_message(name))
        return path

    def _inside_root(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self._root_resolved)

    async def _build_entry(self, name: str, model_dir: Path) -> ModelEntry:
        """Load every version the policy selects; never raises for a model's own problems."""
        if not self._inside_root(model_dir):
            return self._failed(name, None, f"{name} is a symlink that leads outside the model repository")
        if not self._inside_root(model_dir / CONFIG_FILENAME):
            return self._failed(name, None, f"{name}/{CONFIG_FILENAME} is a symlink that leads outside the model "
                                            "repository")
        try:
            config = load_model_config(model_dir, source_name=name, check_name=not self.layout.single)
        except ModelConfigError as exc:
            return self._failed(name, None, str(exc))
        except OSError as exc:  # e.g. the model directory itself cannot be searched
            return self._failed(name, None, f"{name}/{CONFIG_FILENAME} cannot be read: {exc.strerror or exc}")
        try:
            available = self.layout.version_files(model_dir)
        except OSError as exc:
            return self._failed(name, config, f"cannot list {name}: {exc.strerror or exc}")
        if not available:
            return self._failed(name, config, f"no version directories (<model>/<version>/{MODEL_FILENAME}) in {name}")
        selected = config.version_policy.select(list(available))
        if not selected:
            return self._failed(
                name, config,
                f"version policy {config.version_policy.describe()} selects none of the versions {sorted(available)}",
            )
        versions: dict[int, VersionStatus] = {}
        for version in selected:
            try:
                served = await self._load_version(name, version, available[version], config)
            except ModelLoadError as exc:
                log.error("model '%s' version %d is UNAVAILABLE: %s", name, version, exc)
                versions[version] = VersionStatus(version, ModelState.UNAVAILABLE, str(exc))
            else:
                versions[version] = VersionStatus(version, ModelState.READY, "", served)
        return ModelEntry(name, versions, config)

    def _failed(self, name: str, config: ModelConfig | None, reason: str) -> ModelEntry:
        log.error("model '%s' is UNAVAILABLE: %s", name, reason)
        return ModelEntry(name, {}, config, reason=reason)

    async def _load_version(self, name: str, version: int, path: Path, config: ModelConfig) -> ServedVersion:
        shown = self.layout.shown(name, version)
        problem = _file_problem(path)
        if problem is not None:
            raise ModelLoadError(f"{shown} {problem}")
        if not self._inside_root(path):
            raise ModelLoadError(f"{shown} is a symlink that leads outside the repository")
        options = self._runner_options(config)
        runner = await asyncio.to_thread(ModelRunner.load, name, version, path, options)
        batching = self._batching_settings(name, config, runner)
        await self._warm_up(runner, config, batching)
        recorder = self._recorders.setdefault(
            (name, version), StatisticsRecorder(name, version, self._settings.metrics_buckets)
        )
        executor = make_executor(
            runner.run,
            batched=runner.batched,
            settings=batching,
            name=f"{name}:{version}",
            on_batch=_execution_recorder(recorder),
        )
        await executor.start()
        served = ServedVersion(name, version, runner, executor, recorder, config, batching)
        facts = runner.facts
        log.info(
            "loaded model '%s' version %d on %s: %s parameters (%s of weights), max_batch_size %d, %s",
            name, version, runner.provider, f"{facts.parameter_count:,}", _human_bytes(facts.weight_bytes),
            runner.signature.max_batch_size,
            "dynamic batching" if runner.batched and batching.enabled else "no batching",
        )
        return served

    async def _warm_up(self, runner: ModelRunner, config: ModelConfig, batching: BatchingSettings) -> None:
        """Warm the version before it is served (ModelLoadError when a warm-up run fails); see `warmup`."""
        wanted = self._settings.warmup if config.warmup.enabled is None else config.warmup.enabled
        if not wanted:
            return
        sizes = warmup.batch_sizes(runner.signature.max_batch_size, batching.preferred_batch_sizes,
                                   config.warmup.batch_sizes)
        await asyncio.to_thread(warmup.warm_up, runner, sizes, config.warmup.dims, self._settings.warmup_timeout_s)

    def _runner_options(self, config: ModelConfig) -> RunnerOptions:
        s = self._settings
        return RunnerOptions(
            device=config.device or s.device,
            device_id=s.device_id if config.device_id is None else config.device_id,
            intra_op_threads=s.intra_op_threads if config.intra_op_threads is None else config.intra_op_threads,
            inter_op_threads=s.inter_op_threads if config.inter_op_threads is None else config.inter_op_threads,
            graph_optimization_level=config.graph_optimization_level or s.graph_optimization_level,
            max_batch_size=config.max_batch_size,
            default_max_batch_size=s.max_batch_size,
        )

    def _batching_settings(self, name: str, config: ModelConfig, runner: ModelRunner) -> BatchingSettings:
        batching = config.dynamic_batching
        overrides: dict[str, object] = {
            "enabled": self._settings.dynamic_batching if batching.enabled is None else batching.enabled,
            "max_batch_size": max(runner.signature.max_batch_size, 1),
            "instances": config.instances,
            "delay_mode": batching.delay_mode or self._settings.batch_delay_mode,
        }
        if batching.inline_max_compute_us is not None:
            overrides["inline_max_compute_us"] = batching.inline_max_compute_us
        if batching.max_queue_delay_us is not None:
            overrides["max_queue_delay_us"] = batching.max_queue_delay_us
        if batching.preferred_batch_sizes is not None:
            overrides["preferred_batch_sizes"] = batching.preferred_batch_sizes
        if batching.max_queue_size is not None:
            overrides["max_queue_size"] = batching.max_queue_size
        try:
            return BatchingSettings(**overrides)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ModelLoadError(f"{name}/config.json: dynamic_batching: {exc}") from None

    async def _swap(self, name: str, entry: ModelEntry) -> None:
        old = self._models.get(name)
        self._models[name] = entry
        if old is not None:
            keep = {id(s) for s in entry.served_versions}
            for served in old.served_versions:
                if id(served) not in keep:
                    self._retire(served, self._settings.grace_period_s)
        for listener in self._listeners:
            await listener(entry)

    def _retire(self, served: ServedVersion, timeout: float | None) -> None:
        """Drain a replaced version's executor in the background; its session goes when the last request is done."""
        task = asyncio.get_running_loop().create_task(served.executor.stop(drain=True, timeout=timeout))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _unknown_model_message(self, name: str) -> str:
        known = sorted(self._models)
        shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
        return f"unknown model {name[:200]!r}; this server has: {shown or 'no models'}"


def _human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"  # pragma: no cover


def _file_problem(path: Path) -> str | None:
    """Why a model path cannot be opened as a file, in words; None for a regular file.

    `Path.is_file()` says only "no", and raises PermissionError (it swallows only "not found") where a directory
    on the way cannot be searched, which would stop the whole start-up.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "is a symlink to a file that does not exist" if path.is_symlink() else "does not exist"
    except PermissionError:
        return "cannot be read: permission denied"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if not stat.S_ISREG(mode):
        return "is a directory, not a file" if stat.S_ISDIR(mode) else "is not a regular file"
    try:
        with path.open("rb"):  # onnxruntime would say only "system error number 13"
            return None
    except PermissionError:
        return "cannot be read: permission denied"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"


def _parse_version(text: str) -> int | None:
    return int(text) if _VERSION_RE.fullmatch(text) else None


def _execution_recorder(recorder: StatisticsRecorder) -> Callable[[BatchStats], None]:
    return recorder.on_batch  # executions, batch sizes and batch collection waits
