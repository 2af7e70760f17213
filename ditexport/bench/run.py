"""One bench run: every backend, one at a time, each row timed forward and end to end."""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from ..backends.base import resolve_device, synchronize
from ..errors import UsageError
from ..model import DiT, DiTConfig
from .settings import (BASELINE, METHOD, BENCH_BACKENDS, bench_rows, BenchSettings, QUALITY_SETTING, row_key,
                       SAMPLING_STEPS, Skip, UNSTABLE_SPREAD)
from .backends import BenchContext, make_bench_backend
from .measure import dit_forward_flops, forward_inputs, fp16_matmul_tflops, sampler_step_ms, time_calls, timing_spread
from ..logs import get_logger

LOG = get_logger("bench")


# ---------------------------------------------------------------------------------------- the run

def run_bench(model: DiT, source: str, settings: BenchSettings, log=LOG.info,
              export: Callable[[], Path] | None = None) -> dict:
    """Measures every backend on `model`; returns the JSON-ready report (see the module docstring).

    `export` returns the validated export whose ONNX graphs the onnxruntime and tensorrt rows run (the CLI
    passes `build.ensure_export`); without it they take --export-dir as it is.
    """
    cfg = model.config
    device = resolve_device(settings.device)
    rows = bench_rows(settings)
    if any(guided for _, guided in rows) and not cfg.has_null_class:
        raise UsageError("this model has no null class, so it cannot be guided; measure only its unguided "
                         "batch-1 row with --batch-sizes ''")
    requested = settings.backends or BENCH_BACKENDS  # checked by BenchSettings
    names = list(dict.fromkeys([BASELINE, *requested]))  # the baseline always runs, and runs first
    model = model.float().cpu().eval()
    ctx = BenchContext(model, device, settings, max(b for b, _ in rows), Path(settings.out_dir) / _slug(source, cfg),
                       log, export)
    gpu = device.type == "cuda"
    if export is not None and any(not name.startswith("torch") for name in names):
        ctx.export_dir()  # found or built first, so that a refusal comes before minutes of measuring

    report = {
        "model": {"source": source, "config": cfg.to_dict(), "params": sum(p.numel() for p in model.parameters()),
                  "gflops_per_image": dit_forward_flops(cfg) / 1e9},
        "machine": _machine(device),
        "settings": asdict(settings),
        "method": METHOD,
        "matmul_fp16_tflops": None,
        "sampler_ms_per_step": {},
        "results": [], "end_to_end": [], "skipped": [], "failed": [],
    }
    if gpu:
        report["matmul_fp16_tflops"] = fp16_matmul_tflops(device, settings.matmul_size)
        log(f"fp16 matmul ({settings.matmul_size}^3): {report['matmul_fp16_tflops']:.0f} TFLOP/s measured")
    step_counts = (5, 25) if settings.quick else (10, 60)
    for batch, guided in rows:
        report["sampler_ms_per_step"][row_key(batch, guided)] = sampler_step_ms(cfg, batch, guided, device,
                                                                                 step_counts)

    for name in names:
        log(f"{name}:")
        _run_isolated(name, rows, ctx, report, log)
        if name == "torch-compile":
            torch._dynamo.reset()  # compiled graphs hold the model copy (and its GPU memory) until reset
        if gpu:
            torch.cuda.empty_cache()
    _add_ratios(report)
    return report


def _run_isolated(name: str, rows, ctx: BenchContext, report: dict, log) -> None:
    """One backend, made and measured; a failure anywhere is its row's error, and the bench goes on."""
    from ..errors import summary

    backend = None
    try:
        backend = make_bench_backend(ctx, name)
        _measure_backend(backend, name, rows, ctx, report, log)
    except Skip as e:
        log(f"  skipped — {e}")
        report["skipped"].append({"backend": name, "reason": str(e)})
    except Exception as e:  # isolation is the point: any failure of one runtime must not end the bench
        log(f"  FAILED — {summary(e)}")
        report["failed"].append({"backend": name, "error": summary(e)})
    finally:
        if backend is not None:
            backend.close()


def _measure_backend(backend, name, rows, ctx: BenchContext, report: dict, log) -> None:
    cfg, settings, device = ctx.model.config, ctx.settings, backend.device
    tflops = report["matmul_fp16_tflops"]
    for batch, guided in rows:
        x, t, y = forward_inputs(cfg, batch, guided, device)
        times = time_calls(lambda: backend(x, t, y), device, settings.warmup, settings.iters)
        ms = statistics.median(times)
        images = batch // 2 if guided else batch
        sampler_ms = report["sampler_ms_per_step"][row_key(batch, guided)]
        row = {"backend": name, "precision": backend.precision, "device": str(device), "batch": batch,
               "guided": guided, "images_per_forward": images, "ms_per_forward": ms,
               "ms_min": min(times), "ms_max": max(times), "iters": len(times), "spread": timing_spread(times),
               # A batch above the backend's max (e.g. an engine's profile) runs as several forwards.
               "split_into_batches_of": backend.max_batch if backend.max_batch and batch > backend.max_batch
               else None}
        for steps in SAMPLING_STEPS:
            row[f"images_per_s_{steps}"] = images / (steps * (ms + sampler_ms) / 1000)
        row["images_per_s_dpmpp_2m_10"] = images / (QUALITY_SETTING[1] * (ms + sampler_ms) / 1000)
        achieved = dit_forward_flops(cfg, batch) / (ms / 1000) / 1e12
        row["tflops"] = achieved
        row["pct_fp16_matmul_peak"] = 100 * achieved / tflops if tflops else None
        report["results"].append(row)
        unstable = f"  (spread {100 * row['spread']:.0f} %: unstable)" if row["spread"] > UNSTABLE_SPREAD else ""
        log(f"  batch {row_key(batch, guided):>4}: {ms:9.3f} ms per forward{unstable}")
    if any(guided for _, guided in rows):
        report["end_to_end"].append(_end_to_end(backend, name, ctx, report))
        e2e = report["end_to_end"][-1]
        # Derived only where batch 2 (one guided image) was timed.
        derived = (f"{e2e['derived_s']:.3f} s derived (sampler {100 * e2e['sampler_share']:.1f} % of a step)"
                   if e2e["derived_s"] is not None else "not derived (batch 2 not timed)")
        log(f"  one guided image, {e2e['steps']} steps: {e2e['measured_s']:.3f} s measured, {derived}")


def _end_to_end(backend, name: str, ctx: BenchContext, report: dict) -> dict:
    """One real guided sample of one image, timed whole, next to what the per-forward numbers predict."""
    from ..sampler import Sampler, SamplerConfig

    cfg, steps, device = ctx.model.config, ctx.settings.sample_steps, backend.device
    sampler = Sampler(SamplerConfig(num_steps=steps), cfg.in_channels, cfg.num_classes, cfg.learn_sigma)
    labels = torch.zeros(1, dtype=torch.int64)
    sampler.sample(backend, labels, seed=0, input_size=cfg.input_size, device=device)  # warm (graphs exist)
    synchronize(device)
    start = time.perf_counter()
    sampler.sample(backend, labels, seed=1, input_size=cfg.input_size, device=device)
    synchronize(device)
    measured = time.perf_counter() - start
    forward_ms = {(r["batch"], r["guided"]): r["ms_per_forward"] for r in report["results"]
                  if r["backend"] == name}.get((2, True))
    sampler_ms = report["sampler_ms_per_step"].get(row_key(2, True))
    derived = steps * (forward_ms + sampler_ms) / 1000 if forward_ms is not None else None
    return {"backend": name, "steps": steps, "batch": 2, "measured_s": measured, "derived_s": derived,
            "sampler_share": sampler_ms / (forward_ms + sampler_ms) if derived else None}


def _add_ratios(report: dict) -> None:
    """Speed-ups over torch eager and, for the graphs, over the onnxruntime fp32 graph measured in the same run."""
    for baseline, key in ((BASELINE, "speedup_vs_torch_eager"), ("onnxruntime-fp32", "speedup_vs_onnxruntime_fp32")):
        base = {(r["batch"], r["guided"]): r["ms_per_forward"] for r in report["results"] if r["backend"] == baseline}
        for r in report["results"]:
            ref = base.get((r["batch"], r["guided"]))
            r[key] = ref / r["ms_per_forward"] if ref else None


def _slug(source: str, cfg: DiTConfig) -> str:
    import hashlib
    import re

    digest = hashlib.sha256((source + json.dumps(cfg.to_dict(), sort_keys=True)).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9]+', '-', source).strip('-')[:40]}-{digest}"


def _machine(device: torch.device) -> dict:
    info = {"device": device.type, "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "gpu": None}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["compute_capability"] = f"{major}.{minor}"
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    try:
        import tensorrt

        info["tensorrt"] = tensorrt.__version__
    except Exception:
        info["tensorrt"] = None
    return info
