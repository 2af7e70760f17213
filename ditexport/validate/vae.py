"""Parity of the exported VAE decoder with the diffusers decoder it came from (torch fp32)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..export import TOLERANCE  # the DiT's tolerances, against the torch fp32 decoder
from ..export.vae import INPUT_NAME, OUTPUT_NAME, VaeDecodeGraph, sample_latents
from .metrics import needs_emulation, relative_error


def validate_vae_decoder(vae, onnx_path: str | Path, *, precision: str, latent_size: int,
                         batches: tuple[int, ...] = (1, 2, 3), providers: list[str] | None = None,
                         seed: int = 0) -> dict:
    """The ONNX decoder on ONNX Runtime against the torch fp32 decoder: rel. error and max abs per batch size.

    An fp16 graph on the CPU provider runs as its fp16-rounding twin (`export.emulated_copy`), as the
    DiT's do, so that the error measured is the one fp16 hardware makes. The first check is shape, then values.
    """
    import onnxruntime as ort

    from ..artifacts import scratch_dir
    from ..export import emulated_copy

    providers = providers or ["CPUExecutionProvider"]
    emulated = needs_emulation(precision, providers)
    reference = VaeDecodeGraph(vae, "fp32")
    tolerance = TOLERANCE[precision]
    checks = []
    with scratch_dir(Path(onnx_path).parent, "vae-check") as tmp:
        run_path = emulated_copy(onnx_path, tmp) if emulated else onnx_path
        session = ort.InferenceSession(str(run_path), providers=providers)
        for i, batch in enumerate(batches):
            latents = sample_latents(vae, batch, latent_size, seed + i)
            with torch.no_grad():
                expected = reference(latents).numpy()
            got = session.run([OUTPUT_NAME], {INPUT_NAME: latents.numpy()})[0]
            shape_ok = got.shape == expected.shape
            rel, max_abs, finite = (relative_error(got, expected) if shape_ok
                                    else (None, None, bool(np.isfinite(got).all())))
            checks.append({"batch": batch, "shape": list(got.shape), "expected_shape": list(expected.shape),
                           "rel_err": rel, "max_abs": max_abs, "finite": finite,
                           "passed": bool(shape_ok and finite and rel is not None and rel <= tolerance)})
        provider = session.get_providers()[0]
        del session
    return {"file": Path(onnx_path).name, "precision": precision, "tolerance": tolerance, "provider": provider,
            "emulated": emulated, "checks": checks, "passed": all(c["passed"] for c in checks)}
