"""The models the demo offers (the built-in one and every validated export) and the backends that run them."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..artifacts import GRAPH_STEMS, ExportEntry
from ..class_names import class_names
from ..errors import DitexportError
from ..model import DIT_CONFIGS, DiT, DiTConfig
from ..precisions import PRECISIONS
from .limits import BUILTIN_KEY, log


#################################################################################
#                              Models and backends                              #
#################################################################################

@dataclass
class ModelEntry:
    """One model the demo offers: its config, where its weights are, and what can run it."""
    key: str                                   # what the model menu shows
    config: DiTConfig
    source: str                                # where the weights came from, shown after each run
    class_names: list[str]
    load_torch: Callable[[], DiT] | None = None  # the reference model, loaded on first use (XL is 2.7 GB)
    onnx_paths: dict[str, Path] = field(default_factory=dict)   # precision -> (t, y) graph
    cond_paths: dict[str, Path] = field(default_factory=dict)   # precision -> conditioning-vector graph
    engine_paths: dict[str, Path] = field(default_factory=dict)  # graph ("xty", "cond") -> plan for this GPU
    note: str = ""                             # a warning shown with the model (e.g. random weights)
    export_dir: Path | None = None             # the export the graphs belong to, checked before they are opened
    _embedder: object = field(default=None, repr=False)
    _torch_model: DiT | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def torch_model(self) -> DiT | None:
        """The reference model (for the torch backend and the blend embedders), or None where there is none."""
        with self._lock:
            if self._torch_model is None and self.load_torch is not None:
                self._torch_model = self.load_torch()
            return self._torch_model

    def condition_embedder(self):
        """c(t, y) for blending: from the reference model when it is loaded, else from the exported graph
        (five tensors, not the whole checkpoint), else from the reference model loaded now; None if none."""
        from ..blend import TorchConditionEmbedder, embedders_from_onnx

        if self._embedder is None:
            module = self._torch_model
            for path in ([] if module is not None else self.onnx_paths.values()):
                with self.verified([path]):
                    module = embedders_from_onnx(path, self.config)
                if module is not None:
                    break
            if module is None:
                module = self.torch_model
            self._embedder = TorchConditionEmbedder(module) if module is not None else False
        return self._embedder or None

    @contextmanager
    def verified(self, paths: list[Path]):
        """Checks export files against the manifest (under the export's read lock) before the block opens them;
        an export that no longer matches is refused with its rebuild command."""
        if self.export_dir is None:
            yield
            return
        from ..locking import read_lock
        from ..verification import verify_export

        with read_lock(self.export_dir, log=log.info):
            verify_export(self.export_dir, [p for p in paths if p is not None])
            yield

    def backend_choices(self) -> list[str]:
        """The runtimes that can run this model here, as menu values "runtime (precision)"."""
        choices = []
        if self.load_torch is not None:
            choices.append("torch (fp32)")
        if self.onnx_paths and _onnxruntime_backend_class() is not None:
            choices += [f"onnxruntime ({p})" for p in PRECISIONS if p in self.onnx_paths]
        if "xty" in self.engine_paths and _tensorrt_available():
            choices.append("tensorrt (fp16)")
        return choices


def parse_backend_choice(choice: str) -> tuple[str, str]:
    """"onnxruntime (fp16)" -> ("onnxruntime", "fp16")."""
    runtime, _, rest = choice.partition(" (")
    return runtime, rest.rstrip(")") or "fp32"


def _onnxruntime_backend_class():
    """The onnxruntime backend class when onnxruntime is installed, else None (the menu leaves it out)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    from ..backends.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend


def _tensorrt_available() -> bool:
    """Whether the engine module says TensorRT and a CUDA GPU are usable here (to run, not to build)."""
    from ..engine import tensorrt_unavailable_reason

    return tensorrt_unavailable_reason(for_build=False) is None


def _engine_plans(export_dir: Path) -> dict[str, Path]:
    """This machine's TensorRT plans in an export, by graph; none where TensorRT or a GPU is missing."""
    if not _tensorrt_available():
        return {}
    from ..engine import EngineError, find_plan

    plans = {}
    for graph, stem in GRAPH_STEMS.items():
        try:
            plans[graph] = find_plan(export_dir, stem)
        except EngineError:
            continue  # no plan for this GPU: the menu simply does not offer tensorrt
    return plans


def builtin_entry() -> ModelEntry:
    """The built-in digits model; with random weights (and a visible note) while its weights are missing."""
    from ..source import ModelSource

    try:
        model, source = ModelSource.resolve("digits").load(), "built-in digits weights"
        note = ""
    except DitexportError as e:
        model, source = ModelSource.resolve("DiT-digits").load(), "DiT-digits with random weights (seed 0)"
        note = f"Random weights: {e}"
        log.warning("demo: %s", note)
    return ModelEntry(key=BUILTIN_KEY, config=model.config, source=source,
                      class_names=class_names(model.config.num_classes, "digits"), load_torch=lambda: model,
                      note=note)


def export_entries(root: str | Path) -> list[ModelEntry]:
    """One entry per validated, complete export under `root`; others are skipped with one log line each."""
    from ..artifacts import list_exports, manifest_flags, rebuild_command
    from ..verification import verify_files

    root = Path(root)
    if not root.is_dir():
        return []
    entries = []
    for export in list_exports(root):
        rebuild = rebuild_command(export.path, manifest_flags(export.manifest))
        problems = [] if export.validated else [f"its validation failed (see {export.path / 'report.json'})"]
        # Sizes now (cheap); SHA-256 when a request first opens a graph.
        problems += verify_files(export.path, export.manifest.get("files", {}), check_hashes=False)
        if problems:
            log.warning("demo: not offering %s: %s; rebuild it with: %s", export.path, "; ".join(problems), rebuild)
            continue
        try:
            entries.append(_export_entry(export.path, export.manifest))
        except (DitexportError, KeyError, TypeError, ValueError) as e:
            log.warning("demo: skipping export %s: %s", export.path, e)
    return entries


def _export_entry(export_dir: Path, manifest: dict) -> ModelEntry:
    config = DiTConfig.from_dict(manifest["config"])
    export = ExportEntry(export_dir, manifest)
    onnx_paths, cond_paths = export.graph_paths("xty"), export.graph_paths("cond")
    load_torch, source, note = _export_torch_loader(manifest, export_dir)
    name = manifest.get("model_name") or manifest.get("model") or ""
    if config == DIT_CONFIGS["DiT-digits"]:  # that config exists only for the digits model
        name = "digits"
    return ModelEntry(key=f"exports/{export_dir.name}", config=config, source=f"{source}, exported to {export_dir}",
                      class_names=class_names(config.num_classes, name if isinstance(name, str) else None),
                      load_torch=load_torch, onnx_paths=onnx_paths, cond_paths=cond_paths,
                      engine_paths=_engine_plans(export_dir), note=note, export_dir=export_dir)


def _export_torch_loader(manifest: dict, export_dir: Path) -> tuple[Callable[[], DiT] | None, str, str]:
    """A loader of the reference model an export came from, where its weights are still here; a description
    of the weights; and a note when there is no torch model (the graphs still run)."""
    from ..source import ModelSource

    source = ModelSource.from_manifest(manifest)
    if source.available():
        # load_recorded refuses weights whose SHA-256 changed since the export, with the rebuild command.
        return (lambda: source.load_recorded(manifest, export_dir=export_dir)), source.describe(), ""
    return None, source.describe(), "the weights this export came from are not on this machine: no torch backend"
