"""Every default a user can set, declared once as a dataclass field: the sampler's, the build's, the digits
evaluation's and the digits training's. The CLI's flags, `--help`, the demo and the HTTP schema read them from
here. This module imports neither torch nor numpy, so `python -m ditexport --help` stays instant.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .errors import UsageError

#################################################################################
#                                   Sampling                                    #
#################################################################################

SAMPLING_METHODS = ("ddpm", "ddim", "dpmpp-2m")


class SamplerConfigError(UsageError):
    """A sampler setting that cannot be sampled with; `field` names the SamplerConfig field."""

    def __init__(self, field: str, message: str):
        super().__init__(message, field)


@dataclass
class SamplerConfig:
    """What to sample with; defaults are the official `sample.py` settings."""
    num_steps: int = 250
    method: str = "ddpm"             # "ddpm" (ancestral, learned/fixed variance), "ddim" or "dpmpp-2m" (DPM-Solver++)
    guidance_scale: float = 4.0      # 1.0 disables guidance (no doubled batch)
    eta: float = 0.0                 # DDIM stochasticity
    guide_all_channels: bool = False  # official guides 3 latent channels; diffusers guides all
    clip_denoised: bool = False      # official sample.py does not clip latents
    respacing: str | None = None     # ddpm/ddim: overrides str(num_steps), e.g. "ddim50"

    def __post_init__(self):
        # NaN or inf here would run the whole chain and end in black images; refuse them where every caller
        # (CLI, Python API, demo) passes.
        for name in ("guidance_scale", "eta"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and math.isfinite(value)):
                raise SamplerConfigError(name, f"{name} must be a finite number, got {value!r}")


#################################################################################
#                                    Build                                      #
#################################################################################

@dataclass(frozen=True)
class BuildSettings:
    """What `build` makes: graph precisions, the engine's batch profile, the opset, the validation's chain."""
    precisions: tuple[str, ...] = ("fp32", "fp16")  # fp32 always comes along: the graph fp16 is checked against
    max_images: int = 8           # images per request the engine profile covers; guidance doubles the rows
    # Opset 18 with attention as MatMul-Softmax-MatMul, chosen by measurement (docs/export.md): on ONNX Runtime CPU
    # the opset-23 `Attention` op is only 5 % faster, and TensorRT's parser reads that op from 10.14 on only.
    opset: int = 18
    sample_steps: int | None = None  # sample-level parity chain; None: 50 for digits, else 5; 0 skips it
    vae: str | None = None        # latent models: a local diffusers AutoencoderKL directory to export beside the DiT
    force: bool = False           # rebuild even when the manifest says the inputs did not change
    wait: bool = True             # wait for another build of the same directory (False: refuse)


#################################################################################
#                              The digits model                                 #
#################################################################################

@dataclass(frozen=True)
class EvalSettings:
    """`eval`: digits per class; the sampler's settings are `SamplerConfig`'s (guided, and always unguided too)."""
    num_per_class: int = 100  # 1000 digits per run: class agreement within about 1 %, the Fréchet distance stable


@dataclass
class DigitsTrainConfig:
    """Defaults train in about 3 minutes on 2 CPU cores and draw digits of the requested class."""
    steps: int = 4000
    batch_size: int = 64             # small batches, many steps: 1,797 images need no more per step
    lr: float = 1e-3                 # official 1e-4 is for 400k steps at batch 256; a short run needs more
    warmup_steps: int = 200          # transformers trained with Adam at 1e-3 diverge early without warm-up
    weight_decay: float = 0.0        # official train.py
    # 0.9999 (official) averages over ~10k steps, longer than this run; 0.999 averages over the last ~1k.
    ema_decay: float = 0.999
    seed: int = 0
    model: str = "DiT-digits"
