"""Parity of exported graphs with the torch fp32 reference, and the report that says whether an export is good.

Four kinds of evidence, as in DESIGN.md:
- tensor level: every graph on ONNX Runtime at several batch sizes on random non-zero inputs, checked
  names first, then shapes, then values (||a-b||/||b|| and max abs next to the tolerance; NaN/Inf fails);
- per-tensor: when an fp16 check fails, Polygraphy runs the fp32 and fp16 graphs with every tensor marked as
  an output and names the first tensor (in graph order) that drifts;
- stress: weights scaled so the residual stream exceeds the fp16 range; the all-fp16 graph must overflow
  while the mixed-precision graph stays finite and within tolerance;
- sample level: the whole sampler through the ONNX Runtime backend vs torch fp32 with the same noise,
  PSNR per sample and, for 8x8 digit models, agreement of a real-digit classifier.

`metrics` holds the error measures and floors, `tensors` the tensor-level checks and drift location,
`stress` the overflow check, `samples` the sample-level check, `report` the report; the fp16 emulation sits
beside the fp16 policy in `ditexport.export`.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..artifacts import VAE_GRAPH, onnx_filename, scratch_dir, vae_onnx_filename
from ..errors import DitexportError
from ..export import GRAPHS, PRECISIONS, QUANT_PRECISIONS, TOLERANCE, emulate_fp16, emulated_copy
from ..model import DiT
from ..progress import heartbeat
from .metrics import (CLASS_AGREEMENT_FLOOR, DEFAULT_BATCHES, FP16_MAX, SAMPLE_PSNR_FLOOR, needs_emulation, psnr,
                      relative_error)
from .report import ValidationReport, report_differences
from .samples import SampleCheck, _is_digits_config, sample_parity
from .stress import stress_check
from .tensors import GraphCheck, check_graph, graph_feed, locate_drift, reference_output
from .vae import validate_vae_decoder
from ..export.vae import VAE_PRECISIONS
from ..logs import get_logger

LOG = get_logger("validate")

__all__ = ["CLASS_AGREEMENT_FLOOR", "DEFAULT_BATCHES", "FP16_MAX", "SAMPLE_PSNR_FLOOR", "GraphCheck", "SampleCheck",
           "ValidationReport", "check_graph", "emulate_fp16", "emulated_copy", "graph_feed", "locate_drift",
           "needs_emulation", "psnr", "reference_output", "relative_error", "report_differences", "sample_parity",
           "stress_check", "tensorrt_parity", "validate_export"]



def validate_export(export_dir: str | Path, model: DiT, *, model_name: str = "", batches=DEFAULT_BATCHES,
                    sample_steps: int | None = None, sample_images: int | None = None, stress: bool = True,
                    opset: int | None = None, providers: list[str] | None = None, vae=None,
                    log=LOG.info) -> ValidationReport:
    """Validates every graph present in `export_dir` against `model` (and the VAE decoder graphs against `vae`, the
    diffusers AutoencoderKL they came from); see the module docstring."""
    import onnxruntime

    from ..backends.onnxruntime_backend import OnnxRuntimeBackend, default_providers, provider_names

    start = time.perf_counter()
    export_dir = Path(export_dir)
    providers = providers or default_providers()
    model = model.float().eval()
    report = ValidationReport(str(export_dir), model_name, onnxruntime.__version__, provider_names(providers))
    # (graph, precision, form): form "" for fp32/fp16 and the 8-bit TensorRT form, "cpu" for int8's CPU form
    present = {(g, p, f): export_dir / onnx_filename(g, p, f) for g in GRAPHS for p in PRECISIONS
               for f in (("", "cpu") if p == "int8" else ("",)) if (export_dir / onnx_filename(g, p, f)).is_file()}
    references = {}
    for (graph, precision, form), path in present.items():
        stage_start = time.perf_counter()
        with heartbeat(log, f"validate: {path.name} against torch at batches {', '.join(map(str, batches))}"):
            checks = check_graph(model, path, graph=graph, precision=precision, batches=batches,
                                 providers=providers, references=references, form=form)
        report.checks.extend(checks)
        worst = max(checks, key=lambda c: c.rel_err)
        log(f"validate: {path.name:<17} {precision}  worst rel err {worst.rel_err:.2e} "
            f"(tolerance {worst.tolerance:.0e})  {'ok' if all(c.passed for c in checks) else 'FAILED'}  "
            f"({time.perf_counter() - stage_start:.1f} s)")
        fp32 = present.get((graph, "fp32", ""))
        if precision != "fp32" and not all(c.passed for c in checks) and fp32 is not None:
            try:
                report.drift.append(locate_drift(fp32, path, graph_feed(model, graph, 1, seed=1),
                                                 tolerance=TOLERANCE[precision]))
            except DitexportError as e:  # the diagnosis is optional; the failure is already recorded
                report.drift.append({"candidate": path.name, "reference": fp32.name, "error": str(e)})
    vae_graphs = {p: export_dir / vae_onnx_filename(p) for p in VAE_PRECISIONS
                  if vae is not None and (export_dir / vae_onnx_filename(p)).is_file()}
    for precision, path in vae_graphs.items():
        stage_start = time.perf_counter()
        with heartbeat(log, f"validate: {path.name} against the diffusers decoder"):
            check = validate_vae_decoder(vae, path, precision=precision, latent_size=model.config.input_size,
                                         providers=providers)
        report.vae.append(check)
        worst = max(c["rel_err"] for c in check["checks"])
        log(f"validate: {path.name:<17} {precision}  worst rel err {worst:.2e} (tolerance {check['tolerance']:.0e})  "
            f"{'ok' if check['passed'] else 'FAILED'}  ({time.perf_counter() - stage_start:.1f} s)")
    if stress:
        stage_start = time.perf_counter()
        quantized = tuple(p for p in QUANT_PRECISIONS if any(key[1] == p for key in present))
        with heartbeat(log, "validate: stress check"):
            report.stress = stress_check(opset=opset, workdir=export_dir, quantized=quantized)
        log(f"validate: stress check (all-fp16 must overflow, the mixed graph must not)  "
            f"{'ok' if report.stress['passed'] else 'FAILED'}  ({time.perf_counter() - stage_start:.1f} s)")
    if sample_steps != 0:
        digits = _is_digits_config(model.config)
        # The built-in model: one digit per class, 50 steps, seconds. Other models: a short chain of 2 images,
        # since every step is a forward per backend (DiT-XL/2 on 2 CPU cores: ~1 s per image per forward).
        steps = sample_steps or (50 if digits else 5)
        n = sample_images or (model.config.num_classes if digits else 2)
        labels = [i % model.config.num_classes for i in range(n)]
        with scratch_dir(export_dir, "samples") as tmp:
            def make(path: Path, precision: str, form: str):
                def backend():
                    emulate = needs_emulation(precision, providers) and form != "cpu"
                    run = emulated_copy(path, tmp) if emulate else path
                    return OnnxRuntimeBackend(run, model.config, providers=providers)
                return backend

            backends = {path.name: make(path, precision, form) for (graph, precision, form), path in present.items()
                        if graph == "xty"}
            decoders = reference_decoder = None
            if vae_graphs:
                from ..backends.decoders import OnnxRuntimeDecoder, VaeDecoder

                reference_decoder = VaeDecoder.from_vae(vae)
                image_shape = tuple(reference_decoder(torch.zeros(1, model.config.in_channels, model.config.input_size,
                                                                  model.config.input_size)).shape[1:])

                def decoder(precision: str):
                    """The fp32 decoder graph beside the fp32 DiT, the fp16 one (where built) beside the others."""
                    path = vae_graphs["fp16" if precision != "fp32" and "fp16" in vae_graphs else "fp32"]
                    emulated = needs_emulation(path_precision(path), providers)
                    return lambda: OnnxRuntimeDecoder(emulated_copy(path, tmp) if emulated else path,
                                                      image_shape=image_shape, providers=providers, label=path.name)
                decoders = {p: decoder(p) for (g, p, _) in present if g == "xty"}
            report.samples = sample_parity(model, backends, labels=labels, steps=steps, log=log,
                                           reference_decoder=reference_decoder, decoders=decoders)
        for s in report.samples:
            log(f"validate: samples {s.file:<17} PSNR min {min(s.psnr_db):.1f} dB  {'ok' if s.passed else 'FAILED'}  "
                f"({s.seconds:.1f} s)")
    report.seconds = time.perf_counter() - start
    return report


def _engine_feed(model: DiT, graph: str, batch: int) -> dict:
    """Random inputs of one graph: the DiT's, or the VAE decoder's unit-variance latents of the DiT's shape."""
    if graph != VAE_GRAPH:
        return graph_feed(model, graph, batch, seed=batch)
    cfg = model.config
    gen = torch.Generator().manual_seed(batch)
    return {"latents": torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)}


def path_precision(path: Path) -> str:
    """fp16 for "vae.fp16.onnx", fp32 for "vae.onnx"."""
    return "fp16" if ".fp16." in path.name else "fp32"


def tensorrt_parity(export_dir: str | Path, model: DiT, *, batches=DEFAULT_BATCHES, log=LOG.info) -> dict:
    """ONNX Runtime vs this machine's TensorRT engines in the export, side by side in Polygraphy's Comparator.

    Each engine is compared with the ONNX graph it was built from, at `batches`, within that graph's
    tolerance. Returns {"status": "skipped", "reason"} where TensorRT, a GPU or an engine is missing. It is
    the plans' check, recorded in the manifest's engine entry by `build`/`validate`: the ONNX graphs' verdict
    (`validate_export`) never depends on it. Raises EngineError where the comparison cannot run.
    """
    from .. import engine

    reason = engine.tensorrt_unavailable_reason(for_build=False)
    if reason:
        return {"status": "skipped", "reason": reason}
    export_dir = Path(export_dir)
    rows = []
    for graph, stem in engine.plan_stems():
        plan = engine.plan_path_for(export_dir, stem)
        if not plan.is_file():
            continue
        meta = engine.read_engine_metadata(plan)
        onnx_path = export_dir / meta["onnx_file"]
        precision = engine.plan_precision(meta)
        feeds = [{k: v.numpy() for k, v in _engine_feed(model, graph, b).items()}
                 for b in batches if meta["batch"]["min"] <= b <= meta["batch"]["max"]]
        with heartbeat(log, f"validate: {plan.name} against {onnx_path.name} (TensorRT vs ONNX Runtime)"):
            compared = engine.compare_with_onnxruntime(onnx_path, plan, feeds, tolerance=TOLERANCE[precision])
        for row in compared:
            rows.append({**row, "plan": plan.name, "onnx": onnx_path.name, "tolerance": TOLERANCE[precision]})
            log(f"validate: tensorrt {plan.name} vs {onnx_path.name}: batch {row['batch']:>3} rel err "
                f"{row['rel_err']:.2e} max abs {row['max_abs']:.2e} (tolerance {TOLERANCE[precision]:.0e})  "
                f"{'ok' if row['passed'] else 'FAILED'}")
    if not rows:
        return {"status": "skipped", "reason": "the export has no TensorRT engine for this GPU"}
    passed = all(r["passed"] for r in rows)
    log(f"validate: tensorrt vs onnxruntime, {len(rows)} comparisons  {'ok' if passed else 'FAILED'}")
    return {"status": "compared", "rows": rows, "passed": passed}
