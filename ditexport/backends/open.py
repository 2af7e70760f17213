"""The one place that opens a backend: the torch reference, or an export's graphs (onnxruntime) or plans (tensorrt),
checked against the export's manifest under its read lock before the runtime reads them."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DitexportError
from .base import Backend, resolve_device


def check_available(kind: str, device: str | torch.device = "auto") -> None:
    """The cheap checks of a backend (its runtime, the GPU it needs), made before a model is built (DiT-XL/2
    takes about 25 s), so that a missing runtime or GPU is refused at once."""
    if kind == "tensorrt":
        from ..engine import EngineError, tensorrt_unavailable_reason

        reason = tensorrt_unavailable_reason(for_build=False)
        if reason:
            raise EngineError(f"the tensorrt backend is unavailable: {reason}")
    elif kind == "onnxruntime":
        from .onnxruntime_backend import default_providers

        default_providers()  # the one-line "pip install onnxruntime" error where it is missing
    elif kind == "torch":
        _device(device)  # a missing GPU is refused at once
    else:
        raise DitexportError(f"backend {kind!r} is not available in this build")


def open_backend(kind: str, precision: str = "fp32", *, model=None, config=None, export_dir: str | Path | None = None,
                 device: str | torch.device = "auto", max_batch: int | None = None, cuda_graph: bool = False,
                 compile_mode: str | None = None, threads: int | None = None, providers: list | None = None,
                 plan: str | Path | None = None, rebuild_hint: str | None = None, all_sizes: bool = True) -> Backend:
    """A backend of `kind` ("torch", "onnxruntime" or "tensorrt") computing in `precision`.

    torch runs `model`; onnxruntime and tensorrt run the validated export of `config` in `export_dir` (tensorrt:
    this machine's plan there, or `plan`, an engine built apart from the export). A mismatch names `rebuild_hint`.
    """
    check_available(kind, device)
    if kind == "torch":
        from .torch_backend import TorchBackend

        dtype = torch.float16 if precision == "fp16" else torch.float32
        return TorchBackend(model, device=_device(device), dtype=dtype, max_batch=max_batch, cuda_graph=cuda_graph,
                            compile_mode=compile_mode)
    if config is None:
        config = model.config if model is not None else None
    if kind == "onnxruntime":
        return _open_onnxruntime(Path(export_dir), precision, config, device, max_batch, threads, providers,
                                 rebuild_hint, all_sizes)
    device = _device("cuda" if str(device) in ("cpu", "auto") else device)
    if plan is not None:
        from .tensorrt_backend import TensorRTBackend

        # The plan is checked against the SHA-256 in its metadata as it loads.
        return TensorRTBackend(plan, config, max_batch=max_batch, device=device)
    return _open_tensorrt(Path(export_dir), config, device, max_batch, rebuild_hint)


def _device(device: str | torch.device) -> torch.device:
    return resolve_device(device) if isinstance(device, str) else device


def _open_onnxruntime(export_dir: Path, precision: str, config, device, max_batch, threads, providers, hint,
                      all_sizes) -> Backend:
    from ..artifacts import MANIFEST_NAME, rebuild_command
    from ..build import open_export
    from ..locking import read_lock
    from ..verification import verify_export
    from .onnxruntime_backend import OnnxRuntimeBackend

    with read_lock(export_dir):  # a build writing the export is waited for, then its result is read
        if not (export_dir / MANIFEST_NAME).is_file():
            command = (hint or rebuild_command(export_dir)).removesuffix(" --force")
            raise DitexportError(f"no ONNX export in {export_dir}; build it first with: {command}")
        entry = open_export(export_dir, config, [], hint, all_sizes=all_sizes)
        onnx_path, cond_path = entry.graph_path("xty", precision), entry.graph_path("cond", precision)
        if onnx_path is None:
            raise DitexportError(f"the export in {export_dir} has no {precision} graph; rebuild it with "
                                 f"--precision fp32,{precision}")
        verify_export(export_dir, [p for p in (onnx_path, cond_path) if p is not None], rebuild=hint,
                      all_sizes=all_sizes)
        return OnnxRuntimeBackend(onnx_path, _entry_config(entry, config), max_batch=max_batch, cond_path=cond_path,
                                  providers=providers, threads=threads,
                                  device=None if isinstance(device, str) and device == "auto" else _device(device))


def _open_tensorrt(export_dir: Path, config, device: torch.device, max_batch, hint) -> Backend:
    from ..build import open_export
    from ..engine import EngineError, current_environment, find_plan
    from ..locking import read_lock
    from .tensorrt_backend import TensorRTBackend

    with read_lock(export_dir):
        entry = open_export(export_dir, config, [], hint)  # validated, from this model
        env = current_environment(device)  # the plan for the GPU asked for (cuda:N), not the current one
        try:
            plan = find_plan(export_dir, environment=env)
        except EngineError as e:
            failed = entry.manifest.get("engine") or {}
            if failed.get("status") != "failed":
                raise
            # The build's engine stage failed and discarded its plans: say why, and how to retry.
            raise EngineError(f"{e}; the last engine build of this export failed: {failed.get('reason')}; retry "
                              f"with: {failed.get('retry')}") from None
        try:
            cond_plan = find_plan(export_dir, stem="cond", environment=env)
        except EngineError:
            cond_plan = None  # the conditioning-vector engine is optional
        # The plans are checked against the SHA-256 in their metadata as they load.
        return TensorRTBackend(plan, _entry_config(entry, config), cond_plan_path=cond_plan, max_batch=max_batch,
                               device=device)


def _entry_config(entry, config):
    """The model config of an export: the caller's (already checked against the manifest), else the manifest's."""
    from ..model import DiTConfig

    return config if config is not None else DiTConfig.from_dict(entry.manifest["config"])
