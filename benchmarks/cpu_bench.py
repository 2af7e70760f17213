"""CPU measurements behind the export's defaults: ONNX Runtime vs torch eager per forward, side by side.

Every variant is timed in interleaved rounds (A, B, C, A, B, C, ...) on the same inputs, so a busy machine
slows them alike and the ratios stay meaningful; the median over all timed calls is reported.

    python benchmarks/cpu_bench.py compare --models DiT-S/2,DiT-B/2 --batch 4
    python benchmarks/cpu_bench.py options --model DiT-S/2      # opset, optimisation level, threads, fusions
    python benchmarks/cpu_bench.py errors --models DiT-S/2,DiT-B/2,DiT-L/2,DiT-XL/2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ditexport.export import DEFAULT_OPSET, export_graphs, export_onnx, graph_spec
from ditexport.model import DiT, create_model, get_config
from ditexport.progress import heartbeat


def time_interleaved(variants: dict[str, callable], rounds: int = 5, calls: int = 2, warmup: int = 1,
                     log=lambda message: None) -> dict:
    """{name: median ms per call}, timing `calls` calls of each variant per round, variants interleaved;
    logs a line per variant and round as it goes (a round of big models takes tens of seconds)."""
    for name, fn in variants.items():
        start = time.perf_counter()
        for _ in range(warmup):
            fn()
        log(f"  warm-up  {name:<36} {1000 * (time.perf_counter() - start) / max(1, warmup):8.1f} ms")
    samples = {name: [] for name in variants}
    for r in range(rounds):
        for name, fn in variants.items():
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                samples[name].append(1000 * (time.perf_counter() - start))
            log(f"  round {r + 1}/{rounds} {name:<36} {statistics.median(samples[name][-calls:]):8.1f} ms")
    return {name: round(statistics.median(ms), 2) for name, ms in samples.items()}


def _feed(model: DiT, batch: int) -> dict[str, torch.Tensor]:
    return graph_spec(model.config).sample_inputs(batch, seed=0)


def _torch_call(model: DiT, feed):
    def call():
        with torch.inference_mode():
            model(feed["x"], feed["t"], feed["y"])
    return call


def _ort_call(path: Path, feed, threads: int | None = None, optimization: str = "all"):
    from ditexport.backends.onnxruntime_backend import load_session

    session = load_session(path, ["CPUExecutionProvider"], threads=threads, optimization=optimization)
    arrays = {k: v.numpy() for k, v in feed.items()}
    return lambda: session.run(None, arrays)


def compare_onnxruntime_to_torch(model_names=("DiT-S/2", "DiT-B/2"), batch: int = 4, image_size: int = 256,
                                 rounds: int = 5, calls: int = 2, opset: int | None = None, threads: int | None = None,
                                 log=print) -> list[dict]:
    """ms per forward of torch eager fp32 and ONNX Runtime CPU fp32 (this export's graph), per model, both on
    `threads` threads (default: every core this process may use)."""
    threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ditexport-bench-") as tmp:
        for name in model_names:
            model = create_model(get_config(name, image_size=image_size), seed=0)
            with heartbeat(log, f"{name}: exporting to ONNX"):
                path = export_onnx(model, Path(tmp) / "model.onnx", opset=opset)
            log(f"{name} batch {batch}, {threads} thread(s): timing torch eager and onnxruntime, {rounds} rounds")
            feed = _feed(model, batch)
            ms = time_interleaved({"torch": _torch_call(model, feed),
                                   "onnxruntime": _ort_call(path, feed, threads=threads)}, rounds, calls, log=log)
            row = {"model": name, "image_size": image_size, "batch": batch, "threads": threads,
                   "torch_ms": ms["torch"], "onnxruntime_ms": ms["onnxruntime"],
                   "speedup": round(ms["torch"] / ms["onnxruntime"], 2)}
            log(f"{name:<9} batch {batch}, {threads} thread(s): torch eager {row['torch_ms']:8.1f} ms, onnxruntime {row['onnxruntime_ms']:8.1f}"
                f" ms per forward -> {row['speedup']:.2f}x")
            rows.append(row)
            del model
    return rows


def compare_options(model_name: str = "DiT-S/2", batch: int = 4, image_size: int = 256, rounds: int = 5,
                    calls: int = 2, threads: int | None = None, log=print) -> dict:
    """The choices behind the defaults: opset 18 vs 20 vs 23 (Attention op), ORT optimisation levels,
    intra-op threads, and ORT's transformer fusions, all on one model side by side, on `threads` threads
    (default: every core) except the one variant that tries the other thread count."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = get_config(model_name, image_size=image_size)
    model = create_model(cfg, seed=0)
    feed = _feed(model, batch)
    cores = len(os.sched_getaffinity(0))
    threads = threads or cores
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="ditexport-options-") as tmp:
        paths = {}
        for opset in (18, 20, 23):
            with heartbeat(log, f"{model_name}: exporting at opset {opset}"):
                paths[opset] = export_onnx(model, Path(tmp) / f"opset{opset}.onnx", opset=opset)
            log(f"{model_name}: exported at opset {opset}")
        # The SkipLayerNorm fusion fails on affine-free LayerNorms, so it is off; the others run as designed.
        fusion = FusionOptions("vit")
        fusion.enable_skip_layer_norm = False
        fused = optimize_model(str(paths[DEFAULT_OPSET]), model_type="vit", num_heads=cfg.num_heads,
                               hidden_size=cfg.hidden_size, opt_level=0, optimization_options=fusion)
        fused_ops = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
        fused_path = Path(tmp) / "fused.onnx"
        fused.save_model_to_file(str(fused_path))
        variants = {f"torch eager, {threads} thread(s)": _torch_call(model, feed)}
        variants.update({f"opset {o}, level all": _ort_call(p, feed, threads) for o, p in paths.items()})
        for level in ("basic", "extended"):
            variants[f"opset {DEFAULT_OPSET}, level {level}"] = _ort_call(paths[DEFAULT_OPSET], feed, threads, level)
        other = 1 if threads > 1 else cores
        if other != threads:
            variants[f"opset {DEFAULT_OPSET}, {other} thread(s)"] = _ort_call(paths[DEFAULT_OPSET], feed, other)
        variants[f"opset {DEFAULT_OPSET} + transformer fusions"] = _ort_call(fused_path, feed, threads)
        log(f"{model_name} batch {batch}: timing {len(variants)} variants, {rounds} rounds")
        ms = time_interleaved(variants, rounds, calls, log=log)
    for name, value in ms.items():
        log(f"{model_name} batch {batch}: {name:<36} {value:8.1f} ms")
    log(f"transformer optimizer fused: {fused_ops or 'nothing'}")
    return {"model": model_name, "batch": batch, "threads": threads, "ms": ms, "transformer_fusions": fused_ops}


def fp16_errors(model_names=("DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2"), batch: int = 2, image_size: int = 256,
                log=print) -> list[dict]:
    """Rel error and max abs of the fp16 graph (emulated on the CPU) and the fp32 graph vs torch fp32, per size."""
    from ditexport.validate import check_graph

    rows = []
    with tempfile.TemporaryDirectory(prefix="ditexport-errors-") as tmp:
        for name in model_names:
            model = create_model(get_config(name, image_size=image_size), seed=0)
            row = {"model": name, "batch": batch}
            paths = export_graphs(model, tmp, graphs=("xty",), log=log)
            for precision in ("fp32", "fp16"):
                with heartbeat(log, f"{name}: checking the {precision} graph against torch"):
                    (check,) = check_graph(model, paths[("xty", precision)], precision=precision, batches=(batch,),
                                           providers=["CPUExecutionProvider"])
                row[precision] = {"rel_err": check.rel_err, "max_abs": check.max_abs, "passed": check.passed}
            for path in Path(tmp).iterdir():
                path.unlink()
            log(f"{name:<9} fp32 rel err {row['fp32']['rel_err']:.2e} (max abs {row['fp32']['max_abs']:.2e}); "
                f"fp16 rel err {row['fp16']['rel_err']:.2e} (max abs {row['fp16']['max_abs']:.2e})")
            rows.append(row)
            del model
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/cpu_bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("compare", "options", "errors"))
    parser.add_argument("--models", default=None, help="comma-separated config names")
    parser.add_argument("--model", default="DiT-S/2", help="config for `options`")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch and ORT threads (default: all cores)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    models = tuple(args.models.split(",")) if args.models else None
    if args.what == "compare":
        result = compare_onnxruntime_to_torch(models or ("DiT-S/2", "DiT-B/2"), args.batch or 4, args.image_size,
                                              args.rounds, threads=args.threads)
    elif args.what == "options":
        result = compare_options(args.model, args.batch or 4, args.image_size, args.rounds, threads=args.threads)
    else:
        result = fp16_errors(models or ("DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2"), args.batch or 2,
                             args.image_size)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
