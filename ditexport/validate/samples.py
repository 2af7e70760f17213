"""Sample level: whole sampler runs through a backend vs torch fp32, PSNR and digit-class agreement."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..export import release_memory
from ..model import DiT, DiTConfig
from ..progress import heartbeat
from .metrics import CLASS_AGREEMENT_FLOOR, SAMPLE_PSNR_FLOOR, psnr


#################################################################################
#                  Sample level: the whole sampler, same noise                  #
#################################################################################

@dataclass
class SampleCheck:
    """The sampler through one graph vs torch fp32 with the same seed."""
    file: str
    precision: str
    steps: int
    method: str
    guidance_scale: float
    labels: list[int]
    psnr_db: list[float]
    psnr_floor: float
    class_agreement: float | None = None   # digit models: classifier(backend) == classifier(torch)
    backend_classes: list[int] | None = None
    torch_classes: list[int] | None = None
    decoder: str | None = None             # latent models built with a VAE: the decoder graph the images went through
    passed: bool = False
    seconds: float = 0.0                   # sampling through this graph (the torch reference not included)


def _is_digits_config(config: DiTConfig) -> bool:
    return (config.in_channels, config.input_size, config.num_classes) == (1, 8, 10)


def _digits_reference():
    """The real-digit classifier of the zoo (trained on first use, cached)."""
    from ..zoo.digits_eval import DigitsReference

    return DigitsReference()


def sample_parity(model: DiT, backends: dict[str, object], *, labels: list[int], steps: int, seed: int = 0,
                  method: str = "ddpm", guidance_scale: float = 4.0, reference_decoder=None, decoders=None,
                  log=lambda message: None) -> list[SampleCheck]:
    """Samples `labels` with torch fp32 and with each backend (file name -> Backend, or a function making
    one, so big models hold one session at a time), same seed and noise. Latent models built with a VAE compare
    decoded images: the reference through `reference_decoder` (diffusers), each backend through
    `decoders[precision]()` (the exported decoder graph)."""
    from ..backends.base import Backend

    from ..backends import TorchBackend
    from ..sampler import SamplerConfig
    from ..pipeline import Pipeline

    if not model.config.has_null_class:
        guidance_scale = 1.0
    sampler_cfg = SamplerConfig(num_steps=steps, method=method, guidance_scale=guidance_scale)
    what = f"{len(labels)} images, {steps} {method} steps"
    with heartbeat(log, f"validate: sampling the torch reference ({what})", end_line=True):
        reference = Pipeline(TorchBackend(model), reference_decoder).run(labels, seed=seed, sampler_cfg=sampler_cfg,
                                                                         progress=False).images
    classifier = _digits_reference() if _is_digits_config(model.config) else None
    torch_classes = classifier.predict(reference).tolist() if classifier is not None else None
    checks = []
    for file, backend in backends.items():
        start = time.perf_counter()
        with heartbeat(log, f"validate: sampling through {file} ({what})", end_line=True):
            owned = not isinstance(backend, Backend)
            backend = backend() if owned else backend
            precision = backend.precision
            decoder = decoders[precision]() if decoders else None
            images = Pipeline(backend, decoder).run(labels, seed=seed, sampler_cfg=sampler_cfg, progress=False).images
            if decoder is not None:
                decoder.close()
            if owned:
                backend.close()
                del backend
                release_memory()
        values = psnr(images, reference)
        floor = SAMPLE_PSNR_FLOOR[precision]
        check = SampleCheck(file, precision, steps, method, guidance_scale, list(labels), values, floor,
                            torch_classes=torch_classes, seconds=round(time.perf_counter() - start, 2),
                            decoder=decoder.label if decoder is not None else None)
        passed = min(values) >= floor
        if classifier is not None:
            check.backend_classes = classifier.predict(images).tolist()
            check.class_agreement = float(np.mean(np.array(check.backend_classes) == np.array(torch_classes)))
            passed = passed and check.class_agreement >= CLASS_AGREEMENT_FLOOR
        check.passed = passed
        checks.append(check)
    return checks
