"""Calibration: the input range of every quantized GEMM, measured along the sampler's own trajectories.

A diffusion model's activation ranges move with the timestep, so random inputs calibrate badly. The torch model
runs real sampling runs instead: the doubled classifier-free-guidance batch [x; x] with labels [y; null], at the
timesteps the sampler visits, from seeded noise. Each quantized input records its largest |x| per forward call;
the scale's amax is the largest over all calls ("max") or the largest per-call percentile ("percentile": rare
outliers of one call are clipped, while every timestep's bulk still fits). Same seed, same thread count: the
same ranges, bit for bit, hence byte-identical graphs.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

import torch

from ..model import DiT
from ..precisions import QUANTIZABLE, CalibrationSettings, QuantizationError, QuantRecipe

CHUNK_IMAGES = 32   # images sampled together; CFG doubles the rows of each forward


@dataclass
class Calibration:
    """The measured ranges (amax per quantized input) and how they were measured."""
    amax: dict[str, float]
    settings: CalibrationSettings
    recipe: QuantRecipe
    forwards: int = 0
    rows: int = 0
    seconds: float = 0.0
    timesteps: list[int] = field(default_factory=list)
    channel_amax: dict[str, list[float]] = field(default_factory=dict)  # per input channel (SmoothQuant only)

    def to_dict(self) -> dict:
        """What the graphs record; no timing, which would make the same calibration's graphs differ in bytes."""
        return {"settings": self.settings.to_dict(), "activation_amax": self.recipe.activation_amax,
                "forwards": self.forwards, "rows_per_forward": self.rows, "timesteps": self.timesteps,
                "inputs": len(self.amax)}


class _Range:
    """Largest |x| over all calls and the largest per-call percentile of |x|."""

    def __init__(self, percentile: float | None, per_channel: bool = False):
        self.percentile = percentile
        self.max = 0.0
        self.percentile_max = 0.0
        self.channels: torch.Tensor | None = None if not per_channel else torch.zeros(0)

    def add(self, x: torch.Tensor) -> None:
        a = x.detach().float().abs().flatten()
        peak = a.max().item()
        if not math.isfinite(peak):
            raise QuantizationError("the model produced non-finite activations during calibration; "
                                    "8-bit scales cannot be chosen", "layers")
        self.max = max(self.max, peak)
        if self.channels is not None:
            channels = x.detach().float().abs().reshape(-1, x.shape[-1]).amax(0)
            self.channels = channels if self.channels.numel() == 0 else torch.maximum(self.channels, channels)
        if self.percentile is not None:
            k = min(a.numel(), max(1, math.ceil(self.percentile / 100.0 * a.numel())))
            self.percentile_max = max(self.percentile_max, a.kthvalue(k).values.item())

    def amax(self) -> float:
        return self.percentile_max if self.percentile is not None else self.max


def calibration_labels(images: int, num_classes: int) -> list[int]:
    """`images` labels spread evenly over the classes (digits, 10 images: 0..9)."""
    return [i * num_classes // images for i in range(images)]


def calibrate(model: DiT, settings: CalibrationSettings | None = None, recipe: QuantRecipe | None = None,
              log=lambda message: None) -> Calibration:
    """Runs `settings.images` images through the sampler with the torch model and returns every range the
    recipe's Q/DQ pairs need (keys as `insert_qdq` reads them)."""
    from ..pipeline import chunk_seed
    from ..sampler import Sampler, SamplerConfig
    from .trace import _MatMulAttention

    settings, recipe = settings or CalibrationSettings(), recipe or QuantRecipe()
    settings.check()
    recipe.check()
    cfg = model.config
    percentile = recipe.percentile if recipe.activation_amax == "percentile" else None
    ranges: dict[str, _Range] = {}
    hooks, originals = [], []
    linear_names = [n for n in recipe.layers if n != "attention"]
    patterns = [re.compile(QUANTIZABLE[n]) for n in linear_names]
    for path, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and any(p.fullmatch(path) for p in patterns):
            ranges[path] = _Range(percentile, per_channel=recipe.smoothquant_alpha is not None
                                  and isinstance(module, torch.nn.Linear))
            hooks.append(module.register_forward_pre_hook(lambda m, inputs, r=ranges[path]: r.add(inputs[0])))
    was_training = model.training
    model.eval()
    if "attention" in recipe.layers:
        for i, block in enumerate(model.blocks):
            path = f"blocks.{i}.attn"
            for role in ("q", "k", "softmax", "v"):
                ranges[f"{path}.{role}"] = _Range(percentile)
            originals.append(block.attn)
            block.attn = _MatMulAttention(block.attn, observe=lambda role, x, p=path: ranges[f"{p}.{role}"].add(x))
    guidance = settings.guidance_scale if cfg.has_null_class else 1.0
    sampler = Sampler(SamplerConfig(num_steps=settings.steps, method=settings.method, guidance_scale=guidance),
                      cfg.in_channels, cfg.num_classes, cfg.learn_sigma)
    labels = calibration_labels(settings.images, cfg.num_classes)
    start = time.perf_counter()
    forwards, rows = 0, 0

    def counted(x, t, y):
        nonlocal forwards, rows
        forwards += 1
        rows = max(rows, x.shape[0])
        return model(x, t, y)

    try:
        with torch.no_grad():
            for index, first in enumerate(range(0, len(labels), CHUNK_IMAGES)):
                part = torch.tensor(labels[first:first + CHUNK_IMAGES], dtype=torch.int64)
                sampler.sample(counted, part, chunk_seed(settings.seed, index), cfg.input_size)
                log(f"calibrate: {min(first + CHUNK_IMAGES, len(labels))}/{len(labels)} images, "
                    f"{forwards} forwards ({time.perf_counter() - start:.1f} s)")
    finally:
        for h in hooks:
            h.remove()
        for block, attn in zip(model.blocks, originals):
            block.attn = attn
        model.train(was_training)
    channel_amax = {key: r.channels.tolist() for key, r in ranges.items() if r.channels is not None}
    return Calibration({key: r.amax() for key, r in ranges.items()}, settings, recipe, forwards, rows,
                       time.perf_counter() - start, [int(t) for t in sampler.timesteps], channel_amax)


def fake_quantized(model: DiT, amax: dict[str, float], precision: str,
                   calibration: "Calibration | None" = None) -> DiT:
    """A copy of `model` computing what the 8-bit graph computes in fp32 (its CPU form): every Linear named in `amax`
    takes its weight rounded per output channel and its input rounded per tensor, with the scales the graph stores.

    For analysis (per-layer error at any depth, without exporting); attention's matmuls are not covered.
    """
    import copy

    from .quantize import QUANT_MAX, quant_scale, smoothed_amax, smoothing_factors

    model = copy.deepcopy(model)
    qmax = QUANT_MAX[precision]

    def rounded(x: torch.Tensor, scale) -> torch.Tensor:
        if precision == "int8":
            return torch.clamp(torch.round(x / scale), -128, 127) * scale
        return torch.clamp(x / scale, -qmax, qmax).to(torch.float8_e4m3fn).float() * scale

    modules = dict(model.named_modules())
    for path, a in amax.items():
        module = modules.get(path)
        if not isinstance(module, torch.nn.Linear):
            raise QuantizationError(f"{path} is not a Linear of this model; fake quantization covers Linears only",
                                    "layers")
        w = module.weight.detach()
        alpha = calibration.recipe.smoothquant_alpha if calibration is not None else None
        smooth = None
        if alpha is not None and precision == "int8" and path in calibration.channel_amax:
            smooth = torch.tensor(smoothing_factors(calibration.channel_amax[path], w.abs().amax(dim=0).tolist(),
                                                    alpha), dtype=torch.float32)
            w = w * smooth[None, :]
            a = smoothed_amax(calibration.channel_amax[path], smooth.tolist())
        scales = torch.tensor([quant_scale(v, precision) for v in w.abs().amax(dim=1).tolist()])[:, None]
        if precision == "int8":
            module.weight.data.copy_(torch.clamp(torch.round(w / scales), -127, 127) * scales)
        else:
            module.weight.data.copy_(rounded(w, scales))
        scale = quant_scale(a, precision)
        if smooth is None:
            module.register_forward_pre_hook(lambda m, inputs, s=scale: (rounded(inputs[0], s),))
        else:
            inverse = (1.0 / smooth).to(torch.float32)
            module.register_forward_pre_hook(lambda m, inputs, s=scale, i=inverse: (rounded(inputs[0] * i, s),))
    return model
