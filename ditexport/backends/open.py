"""The one place that opens a backend: the torch reference, or an export's graphs (onnxruntime) or plans (tensorrt),
checked against the export's manifest under its read lock before the runtime reads them."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DitexportError
from .base import Backend, resolve_device


def check_available(kind: str, device: str | torch.device = "auto", precision: str = "fp32") -> None:
    """The cheap checks of a backend (its runtime, the GPU it needs, the precisions it computes in), made before
    a model is built (DiT-XL/2 takes about 25 s), so that a missing runtime or GPU is refused at once."""
    from ..precisions import PRECISIONS, QUANT_PRECISIONS

    if precision not in PRECISIONS:
        raise DitexportError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if kind == "torch" and precision in QUANT_PRECISIONS:
        raise DitexportError(f"the torch backend computes in fp32 or fp16; {precision} graphs run on the onnxruntime "
                             f"or tensorrt backend (build them with --precision fp32,fp16,{precision})")
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
    check_available(kind, device, precision)
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
    return _open_tensorrt(Path(export_dir), config, device, max_batch, rebuild_hint, precision)


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
        form = _onnxruntime_form(entry, precision, providers, device)
        onnx_path, cond_path = entry.graph_path("xty", precision, form), entry.graph_path("cond", precision, form)
        if onnx_path is None:
            raise DitexportError(f"the export in {export_dir} has no {precision} graph; rebuild it with: "
                                 f"{_with_precision(hint, entry, export_dir, precision)}")
        verify_export(export_dir, [p for p in (onnx_path, cond_path) if p is not None], rebuild=hint,
                      all_sizes=all_sizes)
        return OnnxRuntimeBackend(onnx_path, _entry_config(entry, config), max_batch=max_batch, cond_path=cond_path,
                                  providers=providers, threads=threads,
                                  device=None if isinstance(device, str) and device == "auto" else _device(device))


def _onnxruntime_form(entry, precision: str, providers, device) -> str:
    """The graph form ONNX Runtime runs: an 8-bit graph's CPU form on the CPU provider, where the export has one
    (the same quantized values; the TensorRT form's fp16 parts are slow there), else the graph itself."""
    from .onnxruntime_backend import CPU, default_providers, provider_names

    if entry.graph_path("xty", precision, "cpu") is None:
        return ""
    device = None if isinstance(device, str) and device == "auto" else _device(device)
    return "cpu" if provider_names(providers or default_providers(device))[0] == CPU else ""


def _with_precision(hint: str | None, entry, export_dir: Path, precision: str) -> str:
    """The build command of this export with `precision` added to the precisions it has."""
    import shlex

    from ..artifacts import manifest_flags, rebuild_command
    from ..precisions import PRECISIONS

    have = [p for p in PRECISIONS if entry.graph_path("xty", p) is not None]
    wanted = ",".join(p for p in PRECISIONS if p in have or p == precision)
    flags = shlex.split(hint)[4:-3] if hint else manifest_flags(entry.manifest)
    words = []
    skip = False
    for word in flags:  # the recorded --precision is replaced
        if skip:
            skip = False
        elif word == "--precision":
            skip = True
        else:
            words.append(word)
    return rebuild_command(export_dir, [*words, "--precision", wanted])


def _open_tensorrt(export_dir: Path, config, device: torch.device, max_batch, hint, precision: str = "fp16") -> Backend:
    from ..build import open_export
    from ..engine import EngineError, current_environment, find_plan
    from ..locking import read_lock
    from ..precisions import QUANT_PRECISIONS
    from .tensorrt_backend import TensorRTBackend

    # 8-bit graphs have plans of their own (`model.int8.<gpu>.<trt>.plan`); fp32/fp16: the export's one plan.
    suffix = f".{precision}" if precision in QUANT_PRECISIONS else ""
    with read_lock(export_dir):
        entry = open_export(export_dir, config, [], hint)  # validated, from this model
        env = current_environment(device)  # the plan for the GPU asked for (cuda:N), not the current one
        plan = find_plan(export_dir, stem=f"model{suffix}", environment=env)
        try:
            cond_plan = find_plan(export_dir, stem=f"cond{suffix}", environment=env)
        except EngineError:
            cond_plan = None  # the conditioning-vector engine is optional
        # The plans are checked against the SHA-256 in their metadata as they load.
        return TensorRTBackend(plan, _entry_config(entry, config), cond_plan_path=cond_plan, max_batch=max_batch,
                               device=device)


def _entry_config(entry, config):
    """The model config of an export: the caller's (already checked against the manifest), else the manifest's."""
    from ..model import DiTConfig

    return config if config is not None else DiTConfig.from_dict(entry.manifest["config"])
