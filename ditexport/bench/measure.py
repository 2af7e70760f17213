"""The measurements: forward FLOPs, timed calls and their spread, sampler overhead, fp16 matmul TFLOP/s."""
from __future__ import annotations

import math
import statistics
import time

import torch

from ..backends.base import synchronize
from ..model import DiTConfig
from .settings import row_key, UNSTABLE_SPREAD


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
            f"{row_key(worst['batch'], worst['guided'])}: {100 * worst['spread']:.0f} %): something else used this "
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
    from ..sampler import Sampler, SamplerConfig

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
