"""Labels, seed and sampler settings -> images, through a backend and a decoder, with timings.

`Pipeline` is the public entry point for sampling (`Pipeline.from_export(...)(class_labels=[...])`); it runs the
sampler over any backend, CHUNK_IMAGES images at a time, and decodes with the export's VAE graphs where it has them.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import UsageError
from .backends.base import Backend, synchronize
from .backends.decoders import VAE_SCALE, VaeDecoder  # noqa: F401  (the decoders a pipeline takes)
from .sampler import Sampler, SamplerConfig

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


OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class PipelineOutput:
    """What a pipeline call returns: the images in the asked form, and how long the work took."""
    images: object                       # list of PIL images | (N, H, W, C) float32 numpy | (N, C, H, W) torch
    labels: list[int]
    seed: int
    sampler: SamplerConfig
    backend: str
    precision: str
    timings: dict                        # total_s, sampler_s, decode_s (sums over chunks), step_ms, chunks


def _progress_wrapper(progress, name: str):
    """The sampler's step-iterator wrapper for `progress`: False (none), True (a tqdm bar) or a callback
    `progress(done_steps, total_steps)`."""
    if not progress:
        return None
    if progress is True:
        from tqdm.auto import tqdm

        return lambda it: tqdm(it, desc=f"sampling ({name})", unit="step", leave=False)

    def report(steps):
        total = len(steps)
        for i, step in enumerate(steps):
            yield step
            progress(i + 1, total)
    return report


class Pipeline:
    """Sampler + backend + decoder: class labels in, images out. The backend decides where the chain runs.

        pipe = Pipeline.from_export("exports/digits", backend="onnxruntime")
        out = pipe(class_labels=[3, 1, 4], num_steps=10, sampler="dpmpp-2m", seed=0)   # out.images: PIL images
    """

    def __init__(self, backend: Backend, decoder=None):
        self.backend = backend
        self.decoder = decoder or IdentityDecoder()
        self.config = backend.config

    # ------------------------------------------------------------------------------------ construction

    @classmethod
    def from_export(cls, export_dir: str | Path, backend: str = "onnxruntime", precision: str = "fp32", *,
                    decoder="auto", device: str = "auto", max_batch: int | None = None,
                    threads: int | None = None) -> "Pipeline":
        """The validated export in `export_dir` on `backend` ("onnxruntime" or "tensorrt"; "torch" runs the
        weights the export recorded). decoder: "auto" (the export's VAE graphs on the same runtime, where it has
        them), "none", the path of a diffusers AutoencoderKL directory (torch reference), or a decoder object."""
        from .backends.open import open_decoder, open_export_backend

        runner = open_export_backend(export_dir, backend, precision, device=device, max_batch=max_batch,
                                     threads=threads)
        return cls(runner, open_decoder(decoder, export_dir, backend, precision, device=runner.device,
                                        threads=threads))

    @classmethod
    def from_model(cls, model, device: str = "auto", precision: str = "fp32", *, decoder=None,
                   max_batch: int | None = None, cuda_graph: bool = False,
                   compile_mode: str | None = None) -> "Pipeline":
        """A torch DiT (`ditexport.load_model`) as the reference backend; decoder: None, the path of a diffusers
        AutoencoderKL directory, or a decoder object."""
        from .backends.open import open_backend, open_decoder

        runner = open_backend("torch", precision, model=model, device=device, max_batch=max_batch,
                              cuda_graph=cuda_graph, compile_mode=compile_mode)
        return cls(runner, open_decoder(decoder, None, "torch", precision, device=runner.device))

    # ---------------------------------------------------------------------------------------- sampling

    def sampler(self, sampler_cfg: SamplerConfig) -> Sampler:
        """The sampler of these settings for this pipeline's model."""
        return Sampler(sampler_cfg, self.config.in_channels, self.config.num_classes, self.config.learn_sigma)

    def check(self, labels: list[int], seed: int, sampler_cfg: SamplerConfig) -> None:
        """Refuses a request before any work (see `check_request`)."""
        check_request(self.config, labels, seed, sampler_cfg)

    def __call__(self, class_labels, *, num_steps: int | None = None, sampler: str | None = None,
                 guidance_scale: float | None = None, eta: float | None = None, seed: int = 0,
                 output_type: str = "pil", sampler_cfg: SamplerConfig | None = None,
                 progress=False) -> PipelineOutput:
        """Images of `class_labels` (ints), sampled CHUNK_IMAGES at a time exactly as `python -m ditexport sample`
        does: the same settings and seed give the same pixels.

        Unset sampler settings take `SamplerConfig`'s defaults (or those of `sampler_cfg`). output_type: "pil"
        (PIL images with the pixels `sample` writes), "np" (float32 N x H x W x C in [0, 1]) or "pt" (float32
        N x C x H x W in [0, 1]). Samples that are not finite raise NonFiniteSamplesError. `progress`: False,
        True (a tqdm bar) or a callback `progress(done_steps, total_steps)`.
        """
        if output_type not in OUTPUT_TYPES:
            raise UsageError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}",
                             "output_type")
        cfg = sampler_cfg_with(sampler_cfg, num_steps=num_steps, method=sampler, guidance_scale=guidance_scale,
                               eta=eta)
        labels = _labels(class_labels)
        parts, total_s, sampler_s, decode_s, steps = [], 0.0, 0.0, 0.0, 0
        for result in self.chunks(labels, seed=seed, sampler_cfg=cfg, progress=progress):
            parts.append(result.images)
            total_s, sampler_s, decode_s = total_s + result.total_s, sampler_s + result.sampler_s, \
                decode_s + result.decode_s
            steps = result.steps
        from .images import check_finite

        images = torch.cat(parts)
        check_finite(images)
        timings = {"total_s": total_s, "sampler_s": sampler_s, "decode_s": decode_s,
                   "step_ms": 1000 * sampler_s / (steps * len(parts)), "chunks": len(parts)}
        return PipelineOutput(images=_convert(images, output_type), labels=labels, seed=seed, sampler=cfg,
                              backend=self.backend.name, precision=self.backend.precision, timings=timings)

    def run(self, labels: list[int], seed: int = 0, sampler_cfg: SamplerConfig | None = None,
            progress=False) -> SampleResult:
        """All `labels` in one batch, noised from one generator seeded with `seed`; images in [0, 1] as tensors."""
        sampler_cfg = sampler_cfg or SamplerConfig()
        self.check(labels, seed, sampler_cfg)
        return self._sample(labels, seed, sampler_cfg, progress)

    def chunks(self, labels: list[int], seed: int = 0, sampler_cfg: SamplerConfig | None = None,
               progress=False, chunk_images: int = CHUNK_IMAGES) -> Iterator[SampleResult]:
        """Any number of images, `chunk_images` at a time (chunk k noised from `chunk_seed(seed, k)`), so memory
        stays bounded; yields each chunk's result. The request is checked once, now, before any work; a request of
        several chunks shows progress over images."""
        sampler_cfg = sampler_cfg or SamplerConfig()
        self.check(labels, seed, sampler_cfg)
        return self._chunks(labels, seed, sampler_cfg, progress, chunk_images)

    def _chunks(self, labels, seed, sampler_cfg, progress, chunk_images) -> Iterator[SampleResult]:
        bar = None
        if progress is True and len(labels) > chunk_images:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(labels), desc="images", unit="image")
        try:
            for index, start in enumerate(range(0, len(labels), chunk_images)):
                part = labels[start:start + chunk_images]
                yield self._sample(part, chunk_seed(seed, index), sampler_cfg, progress)
                if bar is not None:
                    bar.update(len(part))
        finally:
            if bar is not None:
                bar.close()

    def _sample(self, labels: list[int], seed: int, sampler_cfg: SamplerConfig, progress) -> SampleResult:
        """One batch of a checked request."""
        sampler = self.sampler(sampler_cfg)
        device = self.backend.device
        y = torch.tensor([int(v) for v in labels], dtype=torch.int64)
        synchronize(device)
        start = time.perf_counter()
        x0 = sampler.sample(self.backend, y, seed, self.config.input_size, device=device,
                            progress=_progress_wrapper(progress, self.backend.name))
        synchronize(device)
        sampled = time.perf_counter()
        images = self.decoder(x0).float()
        images = ((torch.where(torch.isfinite(images), images.clamp(-1, 1), images) + 1) / 2).cpu()
        done = time.perf_counter()
        return SampleResult(images=images, labels=[int(v) for v in labels], seed=seed, backend=self.backend.name,
                            precision=self.backend.precision, steps=sampler.num_steps,
                            total_s=done - start, sampler_s=sampled - start, decode_s=done - sampled)

    def close(self) -> None:
        """Releases the backend's and the decoder's runtime resources."""
        self.backend.close()
        getattr(self.decoder, "close", lambda: None)()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def sampler_cfg_with(base: SamplerConfig | None = None, **settings) -> SamplerConfig:
    """`base` (default: SamplerConfig()) with the settings that are not None replaced."""
    from dataclasses import replace

    given = {k: v for k, v in settings.items() if v is not None}
    return replace(base or SamplerConfig(), **given)


def _labels(class_labels) -> list[int]:
    """Class labels as a list of ints; one int is one image."""
    if isinstance(class_labels, (int, np.integer)):
        class_labels = [class_labels]
    if isinstance(class_labels, torch.Tensor):
        class_labels = class_labels.reshape(-1).tolist()
    labels = []
    for value in class_labels:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise UsageError(f"class labels must be integers, got {value!r}", "labels")
        labels.append(int(value))
    return labels


def _convert(images: torch.Tensor, output_type: str):
    """(N, C, H, W) floats in [0, 1] -> the asked form; PIL takes the first 3 channels of latents shown undecoded."""
    if output_type == "pt":
        return images
    if output_type == "np":
        return images.permute(0, 2, 3, 1).numpy()
    from PIL import Image

    from .images import to_uint8

    pixels = to_uint8(images[:, :3])
    return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
