"""Error measures (relative error, PSNR), their floors, and when an fp16 graph runs emulated."""
from __future__ import annotations

import math

import numpy as np
import torch



DEFAULT_BATCHES = (1, 2, 5)           # 1, 2 and an odd size on one session: the batch axis is really dynamic
FP16_MAX = 65504.0
# Sample-level floors on PSNR (images in [0, 1]); measured margins are in docs/export.md.
SAMPLE_PSNR_FLOOR = {"fp32": 40.0, "fp16": 25.0, "int8": 15.0, "fp8": 15.0}
CLASS_AGREEMENT_FLOOR = 0.9           # share of samples the digit classifier puts in the same class as torch's


def relative_error(actual, expected) -> tuple[float, float, bool]:
    """(||a - b|| / ||b||, max |a - b|, all finite) in float64."""
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    finite = bool(np.isfinite(a).all())
    if not finite:
        return math.inf, math.inf, False
    diff = a - b
    denom = np.linalg.norm(b)
    rel = float(np.linalg.norm(diff) / denom) if denom > 0 else float(np.linalg.norm(diff))
    return rel, float(np.abs(diff).max()) if diff.size else 0.0, True


def psnr(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """PSNR in dB per sample of two (N, ...) image batches in [0, 1]; inf where they are identical."""
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    return [math.inf if m == 0 else float(10 * math.log10(1.0 / m)) for m in mse.tolist()]


def needs_emulation(precision: str, providers: list) -> bool:
    """fp16 graphs run emulated where the CPU provider would run them (see above)."""
    from ..backends.onnxruntime_backend import provider_names

    return precision != "fp32" and provider_names(providers)[0] == "CPUExecutionProvider"
