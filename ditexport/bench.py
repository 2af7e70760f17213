"""`python -m ditexport bench`: one model through every backend this machine has, measured side by side.

For each backend and forward batch size it reports the median ms per forward (CUDA events on a GPU,
`perf_counter` on the CPU), images/s for 250- and 50-step sampling, the share of the card's fp16 matmul
rate (GPU only, the rate measured in the same run) and the speed-up over torch eager measured in the
same run. Images/s is derived, not guessed: images per forward / (steps x (forward ms + sampler ms)),
where the sampler's own per-step cost is measured by running the real sampler loop with the network
replaced by a constant output, and one real end-to-end sample per backend checks the derivation.
"""
from __future__ import annotations

import copy
import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .backends.base import resolve_device, synchronize
from .errors import DitexportError
from .model import DiT, DiTConfig

BENCH_BACKENDS = ("torch-eager", "torch-cuda-graph", "torch-compile", "onnxruntime-fp32", "onnxruntime-fp16",
                  "tensorrt")
BASELINE = "torch-eager"
GUIDED_BATCHES = (2, 8, 32, 64)
SAMPLING_STEPS = (250, 50)
# The fastest setting within the measurement noise of DDPM 250 on the digits model (docs/digits.md), the demo's
# default. Its images/s uses the DDPM sampler cost per step: DPM-Solver++ draws no noise per step, so this
# slightly understates its throughput.
QUALITY_SETTING = ("dpmpp-2m", 10)
# A measurement whose slowest timed call exceeds its fastest by more than this share of the median was
# disturbed by other work: quiet CPU runs spread 3-36 %, shared ones 84 % and more (docs/gpu.md, "Unstable timings").
UNSTABLE_SPREAD = 0.5


class Skip(Exception):
    """A backend this machine cannot run; the message says why."""


@dataclass
class BenchSettings:
    """What to measure; the defaults are the issue's table, `quick()` a fast smoke run."""
    batch_sizes: tuple[int, ...] = GUIDED_BATCHES   # guided forward batches (2 rows per image)
    unguided: bool = True                           # also batch 1 without guidance
    backends: tuple[str, ...] | None = None         # None: every backend this machine can run
    device: str = "auto"                            # where the torch/onnxruntime backends run
    warmup: int = 5                                 # untimed calls first (CUDA graph capture, autotuning)
    iters: int = 30                                 # timed calls; the median is reported
    sample_steps: int = 250                         # end-to-end check: one guided image, this many steps
    compile_mode: str = "reduce-overhead"
    matmul_size: int = 8192                         # side of the fp16 matmul that measures the card's rate
    builder_optimization_level: int = 3
    export_dir: str | None = None                   # reuse these ONNX files / plans instead of exporting
    out_dir: str = "exports/bench"
    quick: bool = False

    @classmethod
    def quick_settings(cls, **overrides) -> "BenchSettings":
        base = dict(warmup=2, iters=5, sample_steps=20, matmul_size=4096, quick=True)
        base.update(overrides)
        return cls(**base)


# ---------------------------------------------------------------------------------------- FLOPs

def dit_forward_flops(cfg: DiTConfig, batch: int = 1) -> int:
    """Matmul FLOPs of one forward (2 per multiply-add), counted from the architecture.

    Every linear, the patch-embedding convolution, Q K^T and softmax(.) V; element-wise work (norms,
    modulation, activations) is left out, as in the DiT paper's Gflops (which count multiply-adds once).
    """
    T, D, p = cfg.num_patches, cfg.hidden_size, cfg.patch_size
    mlp = int(D * cfg.mlp_ratio)
    per_image = 2 * T * (cfg.in_channels * p * p) * D          # patch embedding
    per_image += 2 * (256 * D + D * D)                         # timestep MLP (256 frequencies)
    block = (2 * D * 6 * D                                     # adaLN modulation (per image, not per token)
             + 2 * T * D * 3 * D                               # qkv
             + 2 * 2 * T * T * D                               # Q K^T and weights @ V
             + 2 * T * D * D                                   # output projection
             + 2 * 2 * T * D * mlp)                            # fc1, fc2
    per_image += cfg.depth * block
    per_image += 2 * D * 2 * D + 2 * T * D * (p * p * cfg.out_channels)  # final adaLN and linear
    return per_image * batch


# ---------------------------------------------------------------------------------------- timing

def time_calls(fn, device: torch.device, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of `iters` calls after `warmup` untimed ones (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return times


def timing_spread(times: list[float]) -> float:
    """(slowest - fastest) / median of one measurement's timed calls: near 0 when nothing else ran."""
    return (max(times) - min(times)) / statistics.median(times)


def unstable_rows(report: dict) -> list[dict]:
    """Results whose timed calls spread more than UNSTABLE_SPREAD: their medians, and ratios, are not to be trusted."""
    return [r for r in report["results"] if r["spread"] > UNSTABLE_SPREAD]


def stability_warning(report: dict) -> str | None:
    """One line naming the unstable rows and what to do about them, or None when every row is stable."""
    rows = unstable_rows(report)
    if not rows:
        return None
    worst = max(rows, key=lambda r: r["spread"])
    return (f"warning: {len(rows)} of {len(report['results'])} measurements are unstable (slowest call more than "
            f"{100 * UNSTABLE_SPREAD:.0f} % of the median above the fastest; worst {worst['backend']} batch "
            f"{_row_key(worst['batch'], worst['guided'])}: {100 * worst['spread']:.0f} %): something else used this "
            f"{'GPU' if report['machine']['gpu'] else 'CPU'}, so times, their order across batches and the x eager "
            f"ratios may not hold; rerun on an idle machine" + ("" if report["machine"]["gpu"] else
                                                                 " or with fewer --torch-threads"))


def forward_inputs(cfg: DiTConfig, batch: int, guided: bool, device: torch.device, seed: int = 0):
    """x, t, y as the sampler feeds them: guided batches carry [labels; null] labels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    t = torch.full((batch,), 500, dtype=torch.int64)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=gen)
    if guided:
        y[batch // 2:] = cfg.num_classes
    return x.to(device), t.to(device), y.to(device)


class _ConstantNetwork:
    """Stands in for the network so that only the sampler's own per-step work is timed."""

    def __init__(self, out: torch.Tensor):
        self.out = out

    def __call__(self, x, t, y):
        return self.out


def sampler_step_ms(cfg: DiTConfig, batch: int, guided: bool, device: torch.device, steps: tuple[int, int]) -> float:
    """The sampler's own cost per step (guidance, DDPM update, noise), from the real loop at two step counts.

    The slope between two runs removes one-off costs; the per-step noise transfer stays in, as in real use.
    """
    from .sampler import Sampler, SamplerConfig

    images = batch // 2 if guided else batch
    labels = torch.zeros(images, dtype=torch.int64)
    out = torch.randn(batch, cfg.out_channels, cfg.input_size, cfg.input_size).clamp(-1, 1).to(device)
    network = _ConstantNetwork(out)
    elapsed = []
    for n in steps:
        sampler = Sampler(SamplerConfig(num_steps=n, guidance_scale=4.0 if guided else 1.0), cfg.in_channels,
                          cfg.num_classes, cfg.learn_sigma)
        x_T, noise = sampler.make_noise((images, cfg.in_channels, cfg.input_size, cfg.input_size), seed=0)
        sampler.run(network, x_T.to(device), labels, noise)  # warm-up (allocator, kernels)
        best = math.inf
        for _ in range(3):
            synchronize(device)
            start = time.perf_counter()
            sampler.run(network, x_T.to(device), labels, noise)
            synchronize(device)
            best = min(best, time.perf_counter() - start)
        elapsed.append(best)
    return max(0.0, 1000 * (elapsed[1] - elapsed[0]) / (steps[1] - steps[0]))


def fp16_matmul_tflops(device: torch.device, size: int, iters: int = 20) -> float:
    """The card's fp16 matmul rate, measured: a size^3 fp16 matmul, median of CUDA-event timings."""
    a = torch.randn(size, size, device=device, dtype=torch.float16)
    b = torch.randn(size, size, device=device, dtype=torch.float16)
    ms = statistics.median(time_calls(lambda: a @ b, device, warmup=5, iters=iters))
    return 2 * size ** 3 / (ms / 1000) / 1e12


# ---------------------------------------------------------------------------------------- backends

@dataclass
class BenchContext:
    """What backend factories need: the pristine fp32 model, where to run, and the export to take graphs from."""
    model: DiT
    device: torch.device
    settings: BenchSettings
    max_batch: int
    engine_dir: Path                                # where the bench builds its own TensorRT engine
    log: callable = print
    export: Callable[[], Path] | None = None        # the validated export (`build`'s, built when missing)
    _export_dir: Path | None = None

    def export_dir(self) -> Path:
        """The export directory: from `export` (resolved once), else --export-dir as it is."""
        if self._export_dir is None:
            if self.export is not None:
                self._export_dir = Path(self.export())
            elif self.settings.export_dir is not None:
                self._export_dir = Path(self.settings.export_dir)
            else:
                raise Skip("no export to take the ONNX graphs from: build one (python -m ditexport build) "
                           "and pass --export-dir")
        return self._export_dir

    def onnx(self, precision: str) -> Path:
        """The (x, t, y) ONNX graph of a precision in the export."""
        from .artifacts import onnx_filename

        path = self.export_dir() / onnx_filename("xty", precision)
        if not path.is_file():
            raise Skip(f"the export has no {precision} graph ({path}); rebuild it with --precision fp32,{precision}")
        from .verification import verify_export

        # Checked against the manifest before ONNX Runtime reads it, as every consumer of an export does; a damaged
        # graph fails its own rows (its ArtifactError is recorded), the others still run.
        verify_export(self.export_dir(), [path], all_sizes=False)
        return path


def _torch_backend(ctx: BenchContext, name: str):
    from .backends import TorchBackend

    gpu = ctx.device.type == "cuda"
    dtype = torch.float16 if gpu else torch.float32
    model = copy.deepcopy(ctx.model)  # TorchBackend moves and casts its model in place
    if name == "torch-eager":
        return TorchBackend(model, ctx.device, dtype)
    if name == "torch-cuda-graph":
        if not gpu:
            raise Skip("CUDA graphs need a CUDA GPU (torch sees none, or --device cpu)")
        return TorchBackend(model, ctx.device, dtype, cuda_graph=True)
    if not gpu and ctx.settings.backends is None:
        raise Skip("not run on the CPU unless asked for (compiling takes minutes on few cores): "
                   "--backends torch-compile")
    return TorchBackend(model, ctx.device, dtype, compile_mode=ctx.settings.compile_mode)


def _onnxruntime_backend(ctx: BenchContext, name: str):
    try:
        import onnxruntime as ort

        from .backends.onnxruntime_backend import OnnxRuntimeBackend
    except ImportError as e:
        raise Skip(f"the onnxruntime backend is unavailable ({e})") from None
    providers = None
    if ctx.device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Skip("onnxruntime has no CUDA provider here (pip install onnxruntime-gpu); "
                       "the CPU provider is benchmarked with --device cpu")
        providers = ["CUDAExecutionProvider"]  # TF32 off and the bench's GPU: see OnnxRuntimeBackend
    precision = name.rsplit("-", 1)[1]
    return OnnxRuntimeBackend(ctx.onnx(precision), ctx.model.config, providers=providers, device=ctx.device)


def _tensorrt_backend(ctx: BenchContext, name: str):
    from .engine import (batch_profiles, build_engine, current_environment, find_plan, plan_path_for,
                         tensorrt_unavailable_reason, timing_cache_filename)

    reason = tensorrt_unavailable_reason(for_build=ctx.settings.export_dir is None)
    if reason:
        raise Skip(reason)
    if ctx.device.type != "cuda":
        raise Skip("TensorRT runs on the GPU; this run benchmarks the CPU (--device cpu)")
    from .backends.tensorrt_backend import TensorRTBackend

    env = current_environment(ctx.device)
    if ctx.settings.export_dir is not None:
        plan = find_plan(ctx.export_dir(), environment=env)  # built by `build`: one profile, opt at its max
    else:
        # The bench's own engine, from the export's graph, kept apart from the export's engines (which cover
        # `build --max-batch` only).
        ctx.engine_dir.mkdir(parents=True, exist_ok=True)
        plan = plan_path_for(ctx.engine_dir, environment=env)
        fp16 = ctx.onnx("fp16")
        # One optimization profile per timed batch, its opt at that batch: each row is timed on kernels
        # chosen for its own size, in one plan (see docs/gpu.md).
        ranges = batch_profiles(b for b, _ in _rows(ctx.settings))
        if _usable_plan(plan, fp16, ranges, ctx.settings.builder_optimization_level, env):
            ctx.log(f"  found cached engine {plan}")
        else:
            ctx.log(f"  building {plan.name} (profiles {', '.join(f'{lo}..{hi}' for lo, _, hi in ranges)}, "
                    f"builder level {ctx.settings.builder_optimization_level}) ...")
            meta = build_engine(fp16, plan, batch_ranges=ranges, device=ctx.device,
                                builder_optimization_level=ctx.settings.builder_optimization_level,
                                timing_cache_path=Path(ctx.settings.out_dir) / timing_cache_filename(
                                    env["gpu_name"], env["tensorrt_version"]))
            ctx.log(f"  built in {meta['build_seconds']:.0f} s")
    return TensorRTBackend(plan, ctx.model.config, device=ctx.device)


def _usable_plan(plan: Path, onnx_path: Path, ranges: list, level: int, env: dict) -> bool:
    """Whether an earlier bench's plan was built here, from this very ONNX, with these profiles."""
    from .engine import EngineError, check_engine_compatibility, check_onnx_unchanged, read_engine_metadata

    try:
        meta = read_engine_metadata(plan)
        check_engine_compatibility(meta, env)
        check_onnx_unchanged(meta, onnx_path)
    except EngineError:
        return False
    return meta.get("batch_profiles") == [list(r) for r in ranges] and meta.get("builder_optimization_level") == level


def make_bench_backend(ctx: BenchContext, name: str):
    """The backend behind a bench name, or Skip with the reason."""
    if name.startswith("torch"):
        return _torch_backend(ctx, name)
    if name.startswith("onnxruntime"):
        return _onnxruntime_backend(ctx, name)
    if name == "tensorrt":
        return _tensorrt_backend(ctx, name)
    raise DitexportError(f"unknown bench backend {name!r}; choose from {', '.join(BENCH_BACKENDS)}")


# ---------------------------------------------------------------------------------------- the run

def _rows(settings: BenchSettings) -> list[tuple[int, bool]]:
    rows = [(1, False)] if settings.unguided else []
    rows += [(b, True) for b in sorted(set(settings.batch_sizes))]
    return rows


def run_bench(model: DiT, source: str, settings: BenchSettings, log=print,
              export: Callable[[], Path] | None = None) -> dict:
    """Measures every backend on `model`; returns the JSON-ready report (see the module docstring).

    `export` returns the validated export whose ONNX graphs the onnxruntime and tensorrt rows run (the CLI
    passes `build.ensure_export`); without it they take --export-dir as it is.
    """
    for b in settings.batch_sizes:
        if b < 2 or b % 2:
            raise ValueError(f"guided batch sizes are even and at least 2 (2 rows per image), got {b}")
    cfg = model.config
    device = resolve_device(settings.device)
    rows = _rows(settings)
    if any(guided for _, guided in rows) and not cfg.has_null_class:
        raise ValueError("this model has no null class, so it cannot be guided; use --batch-sizes '' --unguided")
    requested = settings.backends or BENCH_BACKENDS
    unknown = [b for b in requested if b not in BENCH_BACKENDS]
    if unknown:
        raise DitexportError(f"unknown bench backend(s) {', '.join(unknown)}; choose from {', '.join(BENCH_BACKENDS)}")
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
        "method": __doc__.split("\n\n", 1)[1].strip().replace("\n", " "),
        "matmul_fp16_tflops": None,
        "sampler_ms_per_step": {},
        "results": [], "end_to_end": [], "skipped": [], "failed": [],
    }
    if gpu:
        report["matmul_fp16_tflops"] = fp16_matmul_tflops(device, settings.matmul_size)
        log(f"fp16 matmul ({settings.matmul_size}^3): {report['matmul_fp16_tflops']:.0f} TFLOP/s measured")
    step_counts = (5, 25) if settings.quick else (10, 60)
    for batch, guided in rows:
        report["sampler_ms_per_step"][_row_key(batch, guided)] = sampler_step_ms(cfg, batch, guided, device,
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
    from .engine import one_line

    backend = None
    try:
        backend = make_bench_backend(ctx, name)
        _measure_backend(backend, name, rows, ctx, report, log)
    except Skip as e:
        log(f"  skipped — {e}")
        report["skipped"].append({"backend": name, "reason": str(e)})
    except Exception as e:  # isolation is the point: any failure of one runtime must not end the bench
        log(f"  FAILED — {one_line(e)}")
        report["failed"].append({"backend": name, "error": one_line(e)})
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
        sampler_ms = report["sampler_ms_per_step"][_row_key(batch, guided)]
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
        log(f"  batch {_row_key(batch, guided):>4}: {ms:9.3f} ms per forward{unstable}")
    if any(guided for _, guided in rows):
        report["end_to_end"].append(_end_to_end(backend, name, ctx, report))
        e2e = report["end_to_end"][-1]
        log(f"  one guided image, {e2e['steps']} steps: {e2e['measured_s']:.3f} s measured, "
            f"{e2e['derived_s']:.3f} s derived (sampler {100 * e2e['sampler_share']:.1f} % of a step)")


def _end_to_end(backend, name: str, ctx: BenchContext, report: dict) -> dict:
    """One real guided sample of one image, timed whole, next to what the per-forward numbers predict."""
    from .sampler import Sampler, SamplerConfig

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
    sampler_ms = report["sampler_ms_per_step"].get(_row_key(2, True))
    derived = steps * (forward_ms + sampler_ms) / 1000 if forward_ms is not None else None
    return {"backend": name, "steps": steps, "batch": 2, "measured_s": measured, "derived_s": derived,
            "sampler_share": sampler_ms / (forward_ms + sampler_ms) if derived else None}


def _add_ratios(report: dict) -> None:
    base = {(r["batch"], r["guided"]): r["ms_per_forward"] for r in report["results"] if r["backend"] == BASELINE}
    for r in report["results"]:
        ref = base.get((r["batch"], r["guided"]))
        r["speedup_vs_torch_eager"] = ref / r["ms_per_forward"] if ref else None


def _row_key(batch: int, guided: bool) -> str:
    return f"{batch}" if guided else f"{batch}u"


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


# ---------------------------------------------------------------------------------------- output

def format_table(report: dict) -> str:
    """The short table printed last: one line per backend and batch, then one per failed backend."""
    lines = [f"{'backend':<18} {'prec':<5} {'batch':>5} {'ms/fwd':>9} {'img/s@250':>10} {'img/s@50':>9} "
             f"{'img/s@dpm10':>11} {'%fp16':>6} {'x eager':>8} {'spread':>7}"]
    for r in report["results"]:
        pct = f"{r['pct_fp16_matmul_peak']:.1f}" if r["pct_fp16_matmul_peak"] is not None else "-"
        ratio = f"{r['speedup_vs_torch_eager']:.2f}" if r["speedup_vs_torch_eager"] is not None else "-"
        lines.append(f"{r['backend']:<18} {r['precision']:<5} {_row_key(r['batch'], r['guided']):>5} "
                     f"{r['ms_per_forward']:>9.3f} {r['images_per_s_250']:>10.3g} {r['images_per_s_50']:>9.3g} "
                     f"{r['images_per_s_dpmpp_2m_10']:>11.3g} {pct:>6} {ratio:>8} {100 * r['spread']:>5.0f} %{'!' if r['spread'] > UNSTABLE_SPREAD else ''}")
    for failed in report.get("failed", []):
        lines.append(f"{failed['backend']:<18} FAILED: {failed['error']}")
    return "\n".join(lines)


def write_plot(report: dict, path: Path) -> str | None:
    """ms per forward and images/s (250 steps) against batch, one line per backend; None, or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'ditexport[plot]')"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["backend"] for r in report["results"]):
        rows = [r for r in report["results"] if r["backend"] == name and r["guided"]]
        if not rows:
            continue
        left.plot([r["batch"] for r in rows], [r["ms_per_forward"] for r in rows], marker="o", label=name)
        right.plot([r["images_per_forward"] for r in rows], [r["images_per_s_250"] for r in rows], marker="o",
                   label=name)
    from matplotlib.ticker import ScalarFormatter

    for ax, title, ylabel in ((left, "time per forward (guided batches)", "ms per forward"),
                              (right, "throughput, 250-step guided sampling", "images / s")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    left.set_xlabel("forward batch (2 rows per image)")
    right.set_xlabel("images per forward")
    where = report["machine"]["gpu"] or f"CPU, {report['machine']['cpu_threads']} threads"
    fig.suptitle(f"{report['model']['source']} on {where}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_outputs(report: dict, out_dir: str | Path, stem: str) -> tuple[Path, Path | None, str | None]:
    """The JSON report and the PNG plot (when matplotlib exists) in `out_dir`."""
    from .artifacts import atomic_write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = atomic_write_json(out_dir / f"{stem}.json", report)
    png_path = out_dir / f"{stem}.png"
    note = write_plot(report, png_path)
    return json_path, (None if note else png_path), note
