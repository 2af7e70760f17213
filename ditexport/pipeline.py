"""Labels, seed and sampler settings -> images, through a backend and a decoder, with timings."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .errors import DitexportError, UsageError
from .backends.base import Backend, synchronize
from .sampler import Sampler, SamplerConfig

VAE_SCALE = 0.18215  # the SD VAE latent scale used by DiT
# Images sampled together (and noised from one generator). Fixed, not the backend's max batch, so a request
# draws the same images on every backend; a backend still splits each forward at its own max batch.
CHUNK_IMAGES = 64
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


def check_seed(seed: int) -> None:
    if not isinstance(seed, int) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise UsageError(f"seed must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}, got {seed!r}", "seed")


def chunk_seed(seed: int, index: int) -> int:
    """The noise seed of a request's `index`-th chunk of CHUNK_IMAGES images: the request's own seed for the
    first (so up to CHUNK_IMAGES images are drawn exactly as in one batch), then a hash of (seed, index)."""
    if index == 0:
        return seed
    digest = hashlib.sha256(f"ditexport chunk {seed} {index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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
            raise DitexportError("the VAE decoder needs diffusers: pip install 'ditexport[vae]'") from None
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
    """Images in [0, 1] on the CPU (NaN/inf kept where the model produced them, so that writers refuse them
    instead of drawing black), with what produced them and how long it took."""
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


def check_request(config, labels: list[int], seed: int, sampler_cfg: SamplerConfig) -> None:
    """Refuses a request before any work: labels, seed and guidance this model cannot take."""
    if not labels:
        raise UsageError("no class labels to sample", "labels")
    bad = [y for y in labels if not 0 <= int(y) < config.num_classes]
    if bad:
        raise UsageError(f"class labels must be in 0..{config.num_classes - 1}, got {bad}", "labels")
    check_seed(seed)
    if sampler_cfg.guidance_scale != 1.0 and not config.has_null_class:
        raise UsageError("this model was trained without class dropout, so it cannot be guided; use --cfg-scale 1",
                         "guidance_scale")
    Sampler(sampler_cfg, config.in_channels, config.num_classes, config.learn_sigma)  # steps, method


class Pipeline:
    """Sampler + backend + decoder. The backend decides where the chain runs."""

    def __init__(self, backend: Backend, decoder=None):
        self.backend = backend
        self.decoder = decoder or IdentityDecoder()
        self.config = backend.config

    def sampler(self, sampler_cfg: SamplerConfig) -> Sampler:
        return Sampler(sampler_cfg, self.config.in_channels, self.config.num_classes, self.config.learn_sigma)

    def check(self, labels: list[int], seed: int, sampler_cfg: SamplerConfig) -> None:
        """Refuses a request before any work (see `check_request`)."""
        check_request(self.config, labels, seed, sampler_cfg)

    def __call__(self, labels: list[int], seed: int = 0, sampler_cfg: SamplerConfig | None = None,
                 progress: bool = True) -> SampleResult:
        """All `labels` in one batch, noised from one generator seeded with `seed`."""
        sampler_cfg = sampler_cfg or SamplerConfig()
        self.check(labels, seed, sampler_cfg)
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
        images = self.decoder(x0).float()
        images = ((torch.where(torch.isfinite(images), images.clamp(-1, 1), images) + 1) / 2).cpu()
        done = time.perf_counter()
        return SampleResult(images=images, labels=[int(v) for v in labels], seed=seed, backend=self.backend.name,
                            precision=self.backend.precision, steps=sampler.num_steps,
                            total_s=done - start, sampler_s=sampled - start, decode_s=done - sampled)

    def chunks(self, labels: list[int], seed: int = 0, sampler_cfg: SamplerConfig | None = None,
               progress: bool = True, chunk_images: int = CHUNK_IMAGES) -> Iterator[SampleResult]:
        """Any number of images, `chunk_images` at a time (chunk k noised from `chunk_seed(seed, k)`), so memory
        stays bounded; yields each chunk's result. A request of several chunks shows progress over images."""
        sampler_cfg = sampler_cfg or SamplerConfig()
        self.check(labels, seed, sampler_cfg)
        bar = None
        if progress and len(labels) > chunk_images:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(labels), desc="images", unit="image")
        try:
            for index, start in enumerate(range(0, len(labels), chunk_images)):
                part = labels[start:start + chunk_images]
                yield self(part, seed=chunk_seed(seed, index), sampler_cfg=sampler_cfg, progress=progress)
                if bar is not None:
                    bar.update(len(part))
        finally:
            if bar is not None:
                bar.close()
