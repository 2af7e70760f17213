"""Labels, seed and sampler settings -> images, through a backend and a decoder, with timings."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backends.base import Backend, synchronize
from .diffusion import Sampler, SamplerConfig

VAE_SCALE = 0.18215  # the SD VAE latent scale used by DiT


class IdentityDecoder:
    """Pixel-space models: the sample is the image, in [-1, 1]."""

    name = "identity"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x


class VaeDecoder:
    """The Stable Diffusion VAE decoder (diffusers `AutoencoderKL`) from a local directory."""

    name = "vae"

    def __init__(self, path: str | Path, device="cpu", dtype=torch.float32):
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise RuntimeError("the VAE decoder needs diffusers: pip install 'ditexport[vae]'") from None
        if not Path(path).is_dir():
            raise FileNotFoundError(f"VAE directory not found: {path}")
        self.vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True).to(device=device, dtype=dtype)
        self.vae.eval()
        self.dtype = dtype

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode((latents / VAE_SCALE).to(self.dtype)).sample.float()


@dataclass
class SampleResult:
    """Images in [0, 1] on the CPU, with what produced them and how long it took."""
    images: torch.Tensor                 # (N, C, H, W) float32
    labels: list[int]
    seed: int
    backend: str
    precision: str
    steps: int
    total_s: float
    sampler_s: float
    decode_s: float
    timings: dict = field(default_factory=dict)

    @property
    def step_ms(self) -> float:
        return 1000 * self.sampler_s / self.steps


def check_request(config, labels: list[int], sampler_cfg: SamplerConfig) -> None:
    """Refuses labels outside the model's classes, and guidance for a model that cannot be guided."""
    bad = [y for y in labels if not 0 <= int(y) < config.num_classes]
    if bad:
        raise ValueError(f"class labels must be in 0..{config.num_classes - 1}, got {bad}")
    if sampler_cfg.guidance_scale != 1.0 and not config.has_null_class:
        raise ValueError("this model was trained without class dropout, so it cannot be guided; use --cfg-scale 1")


class Pipeline:
    """Sampler + backend + decoder. The backend decides where the chain runs."""

    def __init__(self, backend: Backend, decoder=None):
        self.backend = backend
        self.decoder = decoder or IdentityDecoder()
        self.config = backend.config

    def sampler(self, sampler_cfg: SamplerConfig) -> Sampler:
        return Sampler(sampler_cfg, self.config.in_channels, self.config.num_classes, self.config.learn_sigma)

    def __call__(self, labels: list[int], seed: int = 0, sampler_cfg: SamplerConfig | None = None,
                 progress: bool = True) -> SampleResult:
        sampler_cfg = sampler_cfg or SamplerConfig()
        check_request(self.config, labels, sampler_cfg)
        sampler = self.sampler(sampler_cfg)
        device = self.backend.device
        wrap = None
        if progress:
            from tqdm.auto import tqdm
            wrap = lambda it: tqdm(it, desc=f"sampling ({self.backend.name})", unit="step", leave=False)
        y = torch.tensor([int(v) for v in labels], dtype=torch.int64)
        synchronize(device)
        start = time.perf_counter()
        x0 = sampler.sample(self.backend, y, seed, self.config.input_size, device=device, progress=wrap)
        synchronize(device)
        sampled = time.perf_counter()
        images = self.decoder(x0)
        images = ((images.float().clamp(-1, 1) + 1) / 2).cpu()
        done = time.perf_counter()
        return SampleResult(images=images, labels=[int(v) for v in labels], seed=seed, backend=self.backend.name,
                            precision=self.backend.precision, steps=sampler.num_steps,
                            total_s=done - start, sampler_s=sampled - start, decode_s=done - sampled)
