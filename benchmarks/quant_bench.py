"""8-bit graphs on the CPU: speed beside fp32, error per layer and depth, and digits quality per precision.

    python benchmarks/quant_bench.py speed --models DiT-S/2,DiT-B/2 --batches 2,4,16 --lock /tmp/ditexport-cpu.lock
    python benchmarks/quant_bench.py layers --models DiT-S/2,DiT-B/2,DiT-L/2,DiT-XL/2
    python benchmarks/quant_bench.py quality --export-dir exports/digits-8bit --out exports/quality  # resumable
    python benchmarks/quant_bench.py quality --export-dir exports/digits-8bit --out exports/quality --report

`speed` exports each model once (fp32 and the 8-bit graphs, calibrated on a short sampling run: random weights)
and times the variants in interleaved rounds on the same inputs; with --lock it holds that file shared while it
exports and exclusively only while it times. `layers` measures the quantization error of each GEMM kind alone and
of the residual stream after every block, in torch (`fake_quantized`, which equals the graph's arithmetic; tested).
`quality` samples 1000 digits per run through the export's graphs and scores them; every chunk of images is saved,
so a run that stops resumes, and each invocation stops after --budget seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_bench import time_interleaved  # noqa: E402

from ditexport.export import CalibrationSettings, export_graphs, graph_spec  # noqa: E402
from ditexport.model import create_model, get_config  # noqa: E402
from ditexport.progress import heartbeat  # noqa: E402


@contextlib.contextmanager
def cpu_lock(path: str | None, exclusive: bool):
    """The machine's CPU lock (COMMON.md): shared while preparing, exclusive while timing; nothing without a path."""
    if path is None:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------- speed

VARIANTS = {  # name -> (precision, form, how ONNX Runtime runs it)
    "fp32": ("fp32", ""),
    "int8": ("int8", "cpu"),               # what the onnxruntime backend runs on the CPU
    "int8-tensorrt": ("int8", ""),         # the TensorRT form as ONNX Runtime's CPU provider runs it
    "fp16": ("fp16", ""),
    "fp8": ("fp8", ""),
}


def speed(models, batches, variants, threads: int, rounds: int, calls: int, lock: str | None, workdir: str | None,
          log=print) -> list[dict]:
    from ditexport.artifacts import onnx_filename
    from ditexport.backends.onnxruntime_backend import load_session

    torch.set_num_threads(threads)
    rows = []
    for name in models:
        with tempfile.TemporaryDirectory(prefix="quant-bench-", dir=workdir) as tmp:
            with cpu_lock(lock, False):
                model = create_model(get_config(name, image_size=256), seed=0)
                precisions = [p for p in ("fp32", "fp16", "int8", "fp8") if any(VARIANTS[v][0] == p for v in variants)]
                with heartbeat(log, f"{name}: exporting {', '.join(precisions)}"):
                    export_graphs(model, tmp, precisions=precisions, graphs=("xty",),
                                  calibration=CalibrationSettings(images=2, steps=10), log=lambda m: None)
                del model
                sessions = {v: load_session(Path(tmp) / onnx_filename("xty", *VARIANTS[v]), ["CPUExecutionProvider"],
                                            threads=threads) for v in variants}
            cfg = get_config(name, image_size=256)
            for batch in batches:
                feed = {k: v.numpy() for k, v in graph_spec(cfg).sample_inputs(batch, seed=0).items()}
                with cpu_lock(lock, False):
                    outputs = {v: s.run(None, feed)[0] for v, s in sessions.items()}
                calls_ = {v: (lambda s=s: s.run(None, feed)) for v, s in sessions.items()}
                log(f"{name} batch {batch}, {threads} thread(s): timing {', '.join(variants)} ({rounds} rounds)")
                with cpu_lock(lock, True):
                    load = os.getloadavg()[0]
                    ms = time_interleaved(calls_, rounds, calls, log=lambda m: None)
                ref = outputs["fp32"] if "fp32" in outputs else None
                for v in variants:
                    err = (float(np.linalg.norm(outputs[v] - ref) / np.linalg.norm(ref)) if ref is not None else None)
                    row = {"model": name, "batch": batch, "threads": threads, "variant": v, "ms": ms[v],
                           "x_fp32": round(ms["fp32"] / ms[v], 2) if "fp32" in ms else None,
                           "rel_err_vs_fp32_graph": err, "load_before": round(load, 2)}
                    rows.append(row)
                    log(f"  {name:<9} batch {batch:>3} {v:<14} {ms[v]:9.1f} ms  x{row['x_fp32']:.2f} vs fp32"
                        + (f"  rel err {err:.2e}" if err is not None else ""))
            del sessions
    return rows


# --------------------------------------------------------------------------------------------- layers

def layers(models, batch: int = 2, log=print) -> list[dict]:
    """Quantization error per GEMM kind (that kind alone quantized) and of the residual stream after each block
    (everything quantized), vs fp32 torch, on random weights at 256 px (or the trained digits model)."""
    from ditexport.export import calibrate
    from ditexport.export.calibrate import fake_quantized
    from ditexport.validate import graph_feed

    from ditexport.zoo import load_builtin

    rows = []
    for name in models:
        # "digits": the trained built-in model with build's default calibration; else random weights at 256 px.
        model = load_builtin("digits") if name == "digits" else create_model(get_config(name, image_size=256), seed=0)
        settings = CalibrationSettings() if name == "digits" else CalibrationSettings(images=2, steps=10)
        with heartbeat(log, f"{name}: calibrating ({settings.images} images x {settings.steps} steps)"):
            cal = calibrate(model, settings)
        feed = graph_feed(model, "xty", batch, seed=1)

        def block_outputs(m):
            outs = []
            hooks = [b.register_forward_hook(lambda _m, _i, o: outs.append(o.detach().clone())) for b in m.blocks]
            with torch.no_grad():
                final = m(feed["x"], feed["t"], feed["y"])
            for h in hooks:
                h.remove()
            return outs, final

        def rel(a, b):
            return float((a - b).norm() / b.norm())

        reference, final = block_outputs(model)
        for precision in ("int8", "fp8"):
            row = {"model": name, "precision": precision, "depth": len(model.blocks),
                   "width": model.config.hidden_size, "per_kind": {}}
            for kind in ("qkv", "proj", "fc1", "fc2"):
                amax = {k: v for k, v in cal.amax.items() if k.endswith(f".{kind}")}
                _, out = block_outputs(fake_quantized(model, amax, precision))
                row["per_kind"][kind] = rel(out, final)
            outs, out = block_outputs(fake_quantized(model, cal.amax, precision))
            row["per_block"] = [rel(o, r) for o, r in zip(outs, reference)]
            row["output"] = rel(out, final)
            rows.append(row)
            depth = row["depth"]
            picks = sorted({0, depth // 4, depth // 2, 3 * depth // 4, depth - 1})
            log(f"{name:<9} {precision}: output {row['output']:.2e}; alone: "
                + ", ".join(f"{k} {v:.1e}" for k, v in row["per_kind"].items())
                + "; residual after block " + ", ".join(f"{i + 1}: {row['per_block'][i]:.1e}" for i in picks))
        del model
    return rows


# -------------------------------------------------------------------------------------------- quality

SETTINGS = {  # name -> (sampler, steps, guidance)
    "dpm10-guided": ("dpmpp-2m", 10, 4.0),
    "dpm10-unguided": ("dpmpp-2m", 10, 1.0),
    "ddpm250-guided": ("ddpm", 250, 4.0),
}
QUALITY_VARIANTS = ("fp32", "fp16", "int8", "int8-tensorrt", "fp8")


def _quality_backend(export_dir: Path, variant: str, workdir: Path):
    """fp32 and int8 as the onnxruntime backend runs them on the CPU (int8: its CPU form); fp16 and the TensorRT
    forms as their fp16-emulated twins, the arithmetic a GPU would do (what validation runs)."""
    from ditexport.artifacts import read_manifest
    from ditexport.backends.onnxruntime_backend import OnnxRuntimeBackend
    from ditexport.backends.open import open_backend
    from ditexport.export import emulated_copy
    from ditexport.model import DiTConfig

    if variant in ("fp32", "int8"):
        return open_backend("onnxruntime", variant, export_dir=export_dir, device="cpu")
    config = DiTConfig.from_dict(read_manifest(export_dir)["config"])
    if "=" in variant:  # NAME=PATH: another tool's graph of this model (e.g. Model Optimizer's), emulated alike
        path = Path(variant.split("=", 1)[1])
    else:
        path = export_dir / {"fp16": "model.fp16.onnx", "int8": "model.int8.onnx", "fp8": "model.fp8.onnx"}[
            variant.split("-")[0]]
    return OnnxRuntimeBackend(emulated_copy(path, workdir), config, providers=["CPUExecutionProvider"])


def quality(export_dir: Path, out: Path, variants, seeds, settings, chunk: int, budget_s: float, log=print) -> bool:
    """Runs every (variant, setting, seed) not yet done, chunk by chunk, until `budget_s`; True when all are done."""
    from ditexport.sampler import Sampler, SamplerConfig

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    labels = torch.tensor([c for c in range(10) for _ in range(100)])
    with tempfile.TemporaryDirectory(prefix="quality-", dir=out) as tmp:
        for variant in variants:
            backend = None
            for setting in settings:
                for seed in seeds:
                    run = out / f"{variant.split('=')[0]}.{setting}.seed{seed}"
                    if (run / "images.npy").is_file():
                        continue
                    method, steps, guidance = SETTINGS[setting]
                    sampler = Sampler(SamplerConfig(num_steps=steps, method=method, guidance_scale=guidance), 1, 10,
                                      True)
                    # The noise of all 1000 images from one generator, as one `eval` run draws it; chunks take rows.
                    x_T, noise = sampler.make_noise((len(labels), 1, 8, 8), seed)
                    run.mkdir(exist_ok=True)
                    for first in range(0, len(labels), chunk):
                        part = run / f"chunk{first:04d}.npy"
                        if part.is_file():
                            continue
                        if time.perf_counter() - start > budget_s:
                            log(f"budget of {budget_s:.0f} s used; run again to continue")
                            return False
                        backend = backend or _quality_backend(export_dir, variant, Path(tmp))
                        rows = slice(first, first + chunk)
                        t0 = time.perf_counter()
                        x0 = sampler.run(backend, x_T[rows], labels[rows], None if noise is None else noise[:, rows])
                        images = ((x0.clamp(-1, 1) + 1) / 2).numpy()
                        np.save(part, images)
                        log(f"{run.name}: images {first}..{first + len(images) - 1} in "
                            f"{time.perf_counter() - t0:.1f} s")
                    parts = sorted(run.glob("chunk*.npy"))
                    np.save(run / "images.npy", np.concatenate([np.load(p) for p in parts]))
                    for p in parts:
                        p.unlink()
            if backend is not None:
                backend.close()
    return True


def quality_report(out: Path, variants, seeds, settings, log=print) -> list[dict]:
    from ditexport.zoo.digits_eval import DigitsReference

    reference = DigitsReference()
    labels = np.array([c for c in range(10) for _ in range(100)])
    rows = []
    for setting in settings:
        for variant in variants:
            scores = []
            for seed in seeds:
                path = out / f"{variant.split('=')[0]}.{setting}.seed{seed}" / "images.npy"
                if not path.is_file():
                    continue
                images = torch.from_numpy(np.load(path))
                agreement, _ = reference.class_agreement(images, labels)
                scores.append({"seed": seed, "class_agreement": agreement,
                               "frechet": reference.frechet_to_real(images)})
            if not scores:
                continue
            a = [s["class_agreement"] for s in scores]
            f = [s["frechet"] for s in scores]
            row = {"setting": setting, "variant": variant.split("=")[0], "seeds": [s["seed"] for s in scores],
                   "scores": scores,
                   "agreement_mean": statistics.mean(a), "agreement_sd": statistics.stdev(a) if len(a) > 1 else None,
                   "frechet_mean": statistics.mean(f), "frechet_sd": statistics.stdev(f) if len(f) > 1 else None}
            rows.append(row)
            sd_a = f" ± {100 * row['agreement_sd']:.2f}" if row["agreement_sd"] is not None else ""
            sd_f = f" ± {row['frechet_sd']:.3f}" if row["frechet_sd"] is not None else ""
            log(f"{setting:<15} {row['variant']:<14} seeds {row['seeds']}: agreement "
                f"{100 * row['agreement_mean']:.2f}{sd_a} %, Fréchet {row['frechet_mean']:.3f}{sd_f}  (seed 0: {100 * a[0]:.1f} %, {f[0]:.3f})")
    log(f"real-vs-real floor (1000 digits): {reference.frechet_floor(1000):.3f}; classifier held-out accuracy "
        f"{100 * reference.held_out_accuracy:.1f} %")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/quant_bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("speed", "layers", "quality"))
    parser.add_argument("--models", default="DiT-S/2,DiT-B/2")
    parser.add_argument("--batches", default="2,4,16")
    parser.add_argument("--variants", default=None, help=f"speed: of {', '.join(VARIANTS)}; quality: of "
                        f"{', '.join(QUALITY_VARIANTS)}")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--lock", default=None,
                        help="the machine's CPU lock file: shared to prepare, exclusive to time")
    parser.add_argument("--workdir", default=None, help="where the speed run's graphs go (default: the system's)")
    parser.add_argument("--export-dir", default=None, help="quality: the digits export with all four precisions")
    parser.add_argument("--out", default=None, help="quality: where every run's images go")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--settings", default="dpm10-guided,dpm10-unguided")
    parser.add_argument("--chunk", type=int, default=1000, help="quality: images sampled per chunk")
    parser.add_argument("--budget", type=float, default=540.0, help="quality: seconds before stopping (resumable)")
    parser.add_argument("--report", action="store_true", help="quality: score the runs that are done")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    models = args.models.split(",")
    if args.what == "speed":
        variants = args.variants.split(",") if args.variants else list(VARIANTS)
        result = speed(models, [int(b) for b in args.batches.split(",")], variants, args.threads, args.rounds,
                       args.calls, args.lock, args.workdir)
    elif args.what == "layers":
        torch.set_num_threads(args.threads)
        result = layers(models)
    else:
        torch.set_num_threads(args.threads)
        variants = args.variants.split(",") if args.variants else list(QUALITY_VARIANTS)
        seeds = [int(s) for s in args.seeds.split(",")]
        settings = args.settings.split(",")
        if not args.report:
            done = quality(Path(args.export_dir), Path(args.out), variants, seeds, settings, args.chunk, args.budget)
            print("all runs done" if done else "not all runs done yet")
        result = quality_report(Path(args.out), variants, seeds, settings)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
