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
        from ..engine.plans import EngineError, tensorrt_unavailable_reason

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


def export_manifest(export_dir: str | Path, rebuild_hint: str | None = None) -> dict:
    """The manifest of the export a backend is to run (once no build is writing it), or one error saying how to
    build it."""
    from ..artifacts import MANIFEST_NAME, read_manifest, rebuild_command
    from ..locking import read_lock

    export_dir = Path(export_dir)
    with read_lock(export_dir):  # a build writing the export is waited for, then its result is read
        if not (export_dir / MANIFEST_NAME).is_file():
            command = (rebuild_hint or rebuild_command(export_dir)).removesuffix(" --force")
            raise DitexportError(f"no ONNX export in {export_dir}; build it first with: {command}")
        return read_manifest(export_dir, rebuild_hint)


def _device(device: str | torch.device) -> torch.device:
    return resolve_device(device) if isinstance(device, str) else device


def _open_onnxruntime(export_dir: Path, precision: str, config, device, max_batch, threads, providers, hint,
                      all_sizes) -> Backend:
    from ..locking import read_lock
    from ..verification import verify_export
    from .onnxruntime_backend import OnnxRuntimeBackend

    with read_lock(export_dir):  # a build writing the export is waited for, then its result is read
        export_manifest(export_dir, hint)
        entry = verify_export(export_dir, [], rebuild=hint, all_sizes=all_sizes, config=config)
        form = _onnxruntime_form(entry, precision, providers, device)
        onnx_path, cond_path = entry.graph_path("xty", precision, form), entry.graph_path("cond", precision, form)
        if onnx_path is None:
            raise DitexportError(f"the export in {export_dir} has no {precision} graph; rebuild it with: "
                                 f"{_with_precision(entry, export_dir, precision)}")
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


def _with_precision(entry, export_dir: Path, precision: str) -> str:
    """The build command of this export (its recorded flags) with `precision` added to the precisions it has."""
    from ..artifacts import manifest_flags, rebuild_command
    from ..precisions import PRECISIONS

    have = [p for p in PRECISIONS if entry.graph_path("xty", p) is not None]
    wanted = ",".join(p for p in PRECISIONS if p in have or p == precision)
    flags = manifest_flags(entry.manifest)
    kept = [w for i, w in enumerate(flags) if w != "--precision" and (i == 0 or flags[i - 1] != "--precision")]
    return rebuild_command(export_dir, [*kept, "--precision", wanted])


def _open_tensorrt(export_dir: Path, config, device: torch.device, max_batch, hint, precision: str = "fp16") -> Backend:
    from ..engine.plans import EngineError, current_environment, find_plan
    from ..locking import read_lock
    from ..precisions import QUANT_PRECISIONS
    from ..verification import verify_export
    from .tensorrt_backend import TensorRTBackend

    # 8-bit graphs have plans of their own (`model.int8.<gpu>.<trt>.plan`); fp32/fp16: the export's one plan.
    suffix = f".{precision}" if precision in QUANT_PRECISIONS else ""
    with read_lock(export_dir):
        entry = verify_export(export_dir, [], rebuild=hint, config=config)  # validated, from this model
        env = current_environment(device)  # the plan for the GPU asked for (cuda:N), not the current one
        try:
            plan = find_plan(export_dir, stem=f"model{suffix}", environment=env)
        except EngineError as e:
            failed = entry.manifest.get("engine") or {}
            if failed.get("status") != "failed":
                raise
            # The build's engine stage failed and discarded its plans: say why, and how to retry.
            raise EngineError(f"{e}; the last engine build of this export failed: {failed.get('reason')}; retry "
                              f"with: {failed.get('retry')}") from None
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


def open_export_backend(export_dir: str | Path, kind: str = "onnxruntime", precision: str = "fp32", *,
                        device: str | torch.device = "auto", max_batch: int | None = None, threads: int | None = None,
                        rebuild_hint: str | None = None) -> Backend:
    """`open_backend` on a validated export: its graphs or plans checked against the manifest under the export's
    read lock; the torch backend runs the weights the export was built from (refused when they changed since)."""
    check_available(kind, device, precision)
    if kind == "torch":
        from ..source import ModelSource
        from ..verification import verify_export

        manifest = verify_export(export_dir, [], rebuild=rebuild_hint, all_sizes=False).manifest
        model = ModelSource.from_manifest(manifest).load_recorded(manifest, rebuild_hint, export_dir)
        return open_backend("torch", precision, model=model, device=device, max_batch=max_batch)
    return open_backend(kind, precision, export_dir=export_dir, device=device, max_batch=max_batch, threads=threads,
                        rebuild_hint=rebuild_hint)


def open_decoder(decoder, export_dir: str | Path | None, kind: str = "onnxruntime", precision: str = "fp32", *,
                 device: str | torch.device = "cpu", threads: int | None = None):
    """The decoder of a pipeline: None or "none" (samples are the images), "auto" (the export's VAE graphs on the
    runtime `kind` runs, where the export has them; else none), a path to a local diffusers AutoencoderKL (the torch
    reference), or a decoder object, returned as it is."""
    if decoder is None or decoder == "none":
        return None
    if decoder == "auto":
        if export_dir is None or kind == "torch":
            return None
        from .decoders import open_export_decoder

        return open_export_decoder(Path(export_dir), kind, precision, device=device, threads=threads)
    if isinstance(decoder, (str, Path)):
        from .decoders import VaeDecoder

        return VaeDecoder(decoder, device=_device(device) if isinstance(device, str) else device)
    return decoder
